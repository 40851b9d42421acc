"""Ollama's embedding routes on our server: ``POST /api/embed`` (one embedding per input) and the legacy
``POST /api/embeddings`` (one prompt). The vectors are ``pipeline.model.embeddings``: mean-pooled final hidden states,
L2-normalised. They run in the generation pool, so they share its ``--concurrency`` slots with generations.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from pipeline.serve.engine import Engine
from pipeline.serve.request_parsing import ApiError, parse
from pipeline.serve.served_model import ServedModel


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: int | None = None
    options: dict | None = None
    keep_alive: str | int | float | None = None


class LegacyEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    prompt: str = ""
    options: dict | None = None
    keep_alive: str | int | float | None = None


def embedding_ids(model: ServedModel, text: str, truncate: bool = True) -> list[int]:
    """The ids a text is embedded from: at most the context's length (the start kept), else a 400."""
    ids = model.encoding.encode_ordinary(text)
    if len(ids) > model.context_length and not truncate:
        raise ApiError(
            400,
            f"input length {len(ids)} tokens exceeds the context length {model.context_length} "
            "(send truncate: true to keep the start)",
        )
    return ids[: model.context_length]


async def embed_all(engine: Engine, model: ServedModel, inputs: list[list[int]]) -> list[list[float]]:
    """Embeddings of each id list, computed in the generation pool under one of its slots."""
    if not model.embeds:
        raise ApiError(
            400,
            f"model '{model.name}' does not support embeddings (only torch model directories do; "
            "the ONNX graph outputs logits only)",
        )
    if any(not ids for ids in inputs):
        raise ApiError(400, "invalid request: input: cannot embed an empty text")
    async with engine.slots:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(engine.pool, lambda: [model.tokens.embed(ids) for ids in inputs])


def check_dimensions(model: ServedModel, dimensions: int | None, width: int) -> None:
    if dimensions is not None and dimensions != width:
        raise ApiError(
            400,
            f"model '{model.name}' embeds into {width} dimensions; 'dimensions' {dimensions} "
            "is not supported",
        )


def register(app: FastAPI, engine: Engine) -> None:
    """Add ``/api/embed`` and ``/api/embeddings`` to ``app`` (beside the Ollama API of pipeline/serve/ollama_api.py)."""

    @app.post("/api/embed")
    async def embed(http: Request) -> dict:
        request = await parse(http, EmbedRequest)
        model = engine.model(request.model)
        texts = [request.input] if isinstance(request.input, str) else request.input
        start = time.perf_counter_ns()
        if texts == [""]:  # Ollama: an empty input loads the model
            texts = []
        ids = [embedding_ids(model, text, request.truncate) for text in texts]
        vectors = await embed_all(engine, model, ids) if ids else []
        if vectors:
            check_dimensions(model, request.dimensions, len(vectors[0]))
        return {
            "model": model.name,
            "embeddings": vectors,
            "total_duration": time.perf_counter_ns() - start,
            "load_duration": 0,
            "prompt_eval_count": sum(map(len, ids)),
        }

    @app.post("/api/embeddings")
    async def embeddings(http: Request) -> dict:
        request = await parse(http, LegacyEmbedRequest)
        model = engine.model(request.model)
        if not request.prompt:
            return {"embedding": []}
        [vector] = await embed_all(engine, model, [embedding_ids(model, request.prompt)])
        return {"embedding": vector}
