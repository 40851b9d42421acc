"""What a request body becomes on our server: the JSON-body parser, the Ollama generation options, the API error.

Shared by the Ollama, embedding and OpenAI routes; it knows nothing of models or generation.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.common.errors import one_line

MIN_CONTEXT = 2  # one prompt token and one answer token


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Options(BaseModel):
    """The generation options we honour; others that Ollama knows (repeat_penalty, mirostat…) are ignored.

    Out-of-range values are refused with a 400 naming the option; ``num_ctx`` and ``num_predict`` are clamped
    to what the model can hold (docs/serving.md lists both kinds)."""

    model_config = ConfigDict(extra="allow")
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)  # 1 disables it
    seed: int | None = Field(None, ge=0, lt=2**64)  # None: a fresh random seed per request, as in Ollama
    num_predict: int | None = None  # ≤ 0 / None: until the context is full; clamped to the context's room
    num_ctx: int | None = Field(None, ge=MIN_CONTEXT)  # clamped to the model's context length
    stop: list[str] | str | None = None


def validation_message(errors: list[dict]) -> str:
    error = errors[0]
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
    return one_line(f"invalid request: {where}: {error.get('msg')}")


async def parse(http: Request, schema: type[BaseModel]) -> Any:
    """The JSON body as ``schema``, whatever the Content-Type (Ollama clients do not all send one)."""
    body = await http.body()
    try:
        data = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"invalid JSON in the request body: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"invalid request: the body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc.errors())) from None
