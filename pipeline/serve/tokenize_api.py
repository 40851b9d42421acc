"""vLLM's tokenizer routes on our server: ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``.

lm-evaluation-harness's ``tokenizer_backend=remote`` tokenizes through them, so it can send ``/v1/completions``
token ids our models read as they are (our tokenizers are tiktoken files, not Hugging Face tokenizers it could
load). A request may name ``model``; without it, every served model must share one tokenizer. Text is encoded as
vLLM does, its special tokens (``<|endoftext|>``…) recognised. It knows nothing of generation.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from pipeline.data.tokenizer import EOT
from pipeline.serve.engine import Engine
from pipeline.serve.request_parsing import ApiError, parse
from pipeline.serve.served_model import ServedModel


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str
    add_special_tokens: StrictBool = False  # our tokenizers add none (no BOS)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[StrictInt] = Field(min_length=0)


def tokenizer_of(engine: Engine, name: str | None) -> ServedModel:
    """The named model, or any served model when they all share one tokenizer."""
    if name:
        return engine.model(name)
    models = list(engine.models.values())
    if len({(m.encoding.name, m.encoding.n_vocab) for m in models}) != 1:
        raise ApiError(400, "the served models have different tokenizers: name one with 'model'")
    return models[0]


def register(app: FastAPI, engine: Engine) -> None:
    """Add the tokenizer routes to ``app`` (pipeline/serve/app.py)."""

    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None) -> dict:
        served = tokenizer_of(engine, model)
        eos = EOT if EOT in served.encoding.special_tokens_set else None
        return {
            "tokenizer_class": "tiktoken",
            "name": served.encoding.name,
            "vocab_size": served.encoding.n_vocab,
            "eos_token": eos,
            "bos_token": None,
            "pad_token": None,
            "model_max_length": served.context_length,
            "chat_template": None,
        }

    @app.post("/tokenize")
    async def tokenize(http: Request) -> dict:
        request = await parse(http, TokenizeRequest)
        served = tokenizer_of(engine, request.model)
        tokens = served.encoding.encode(request.prompt, allowed_special="all")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.context_length}

    @app.post("/detokenize")
    async def detokenize(http: Request) -> dict:
        request = await parse(http, DetokenizeRequest)
        served = tokenizer_of(engine, request.model)
        if any(not 0 <= t < served.encoding.n_vocab for t in request.tokens):
            raise ApiError(400, f"invalid request: tokens: ids must be in [0, {served.encoding.n_vocab})")
        return {"prompt": served.encoding.decode(request.tokens)}
