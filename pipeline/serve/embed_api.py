"""Ollama's embedding routes on our server: ``POST /api/embed`` (one embedding per input) and the legacy
``POST /api/embeddings`` (one prompt). The vectors are ``pipeline.model.embeddings``: mean-pooled final hidden states,
L2-normalised. They run in the generation pool, so they share its ``--concurrency`` slots and its queue with
generations, one input at a time; a client that leaves cancels the rest of its batch. A request holds at most
``MAX_INPUTS`` inputs. As in Ollama, an empty input (``""`` or ``[]``) loads the model and embeds nothing; an
empty text in a list is a 400.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from pipeline.serve.engine import CLIENT_CLOSED, ClientClosed, Engine, collect
from pipeline.serve.request_parsing import MAX_INT32, ApiError, Options, int_in, parse
from pipeline.serve.served_model import ServedModel

MAX_INPUTS = 2048  # inputs per embedding request, OpenAI's own limit


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str] = ""
    truncate: StrictBool = True
    dimensions: int_in(1, MAX_INT32) | None = None
    options: Options | None = None  # unused, but refused when out of range as on the other routes
    keep_alive: str | int | float | None = None


class LegacyEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    prompt: str = ""
    options: Options | None = None
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


def check_count(count: int) -> None:
    if count > MAX_INPUTS:
        raise ApiError(400, f"invalid request: input: at most {MAX_INPUTS} inputs per request, got {count}")


async def embed_all(
    engine: Engine, http: Request, model: ServedModel, inputs: list[list[int]]
) -> list[list[float]]:
    """Embeddings of each id list, computed in the generation pool under one of its slots (503 when the queue is
    full); ``ClientClosed`` when the client leaves first, which stops the batch at its next input."""
    if not model.embeds:
        raise ApiError(
            400,
            f"model '{model.name}' does not support embeddings (only torch model directories do; "
            "the ONNX graph outputs logits only)",
        )
    if empty := [i for i, ids in enumerate(inputs) if not ids]:
        raise ApiError(400, f"invalid request: input[{empty[0]}]: cannot embed an empty text")
    _, vectors = await collect(engine.embed(model, inputs), http)
    return vectors


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
    async def embed(http: Request):
        request = await parse(http, EmbedRequest)
        model = engine.model(request.model)
        texts = [request.input] if isinstance(request.input, str) else request.input
        if request.input == "":  # Ollama: an empty input ("" or []) loads the model
            texts = []
        check_count(len(texts))
        start = time.perf_counter_ns()
        ids = [embedding_ids(model, text, request.truncate) for text in texts]
        try:
            vectors = await embed_all(engine, http, model, ids) if ids else []
        except ClientClosed:
            return Response(status_code=CLIENT_CLOSED)
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
    async def embeddings(http: Request):
        request = await parse(http, LegacyEmbedRequest)
        model = engine.model(request.model)
        if not request.prompt:
            return {"embedding": []}
        try:
            [vector] = await embed_all(engine, http, model, [embedding_ids(model, request.prompt)])
        except ClientClosed:
            return Response(status_code=CLIENT_CLOSED)
        return {"embedding": vector}
