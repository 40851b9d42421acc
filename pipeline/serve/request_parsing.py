"""What a request body becomes on our server: the JSON-body parser, the Ollama generation options, the API error.

Shared by the Ollama, embedding and OpenAI routes; it knows nothing of models or generation. A body that is not
a JSON object, is nested deeper than ``MAX_DEPTH`` or holds a field of the wrong type or range is an
``ApiError(400)`` with a one-line reason (docs/serving.md has the table).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

from pipeline.common.errors import one_line

MIN_CONTEXT = 2  # one prompt token and one answer token
MAX_DEPTH = 64  # JSON nesting; our deepest field, messages[i].content[j].text, is 4 levels down
MAX_INT_DIGITS = 100  # nothing we accept needs more than 20 digits (a seed < 2**64)
MAX_INT32 = 2**31 - 1  # num_predict, max_tokens, num_ctx, top_k: more is a mistake (the context caps them)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def int_in(low: int, high: int, *also: int, meaning: str = ""):
    """An integer field in ``low..high`` (or one of ``also``), else refused with the range in the message."""
    accepted = " or ".join(map(str, also)) + f" {meaning} or " if also else ""
    message = f"must be {accepted}an integer in {low}..{high}"

    def check(value: object) -> int:
        whole = (isinstance(value, int) and not isinstance(value, bool)) or (  # JSON true is no number
            isinstance(value, float) and value.is_integer()  # 5.0 is 5, as in Ollama (inf is no integer)
        )
        if not whole or not (low <= value <= high or value in also):
            raise PydanticCustomError("int_range", message)
        return int(value)

    return Annotated[int, PlainValidator(check)]


class Options(BaseModel):
    """The Ollama options: those we honour, and Ollama's others (``mirostat``, ``min_p``…), accepted when of the
    right type and range and then ignored (our sampler has none of them).

    As in Ollama, a number must be a JSON number and a flag a JSON boolean (strict types, no "0.5" or "yes").
    Out-of-range values are refused with a 400 naming the option; ``num_ctx`` and ``num_predict`` are clamped
    to what the model can hold (docs/serving.md lists both kinds). Options Ollama does not know are ignored."""

    model_config = ConfigDict(extra="allow", strict=True)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_k: int_in(1, MAX_INT32) | None = None
    top_p: float | None = Field(None, gt=0, le=1)  # 1 disables it
    seed: int_in(0, 2**64 - 1) | None = None  # None: a fresh random seed per request, as in Ollama
    # -1 / -2 (Ollama's "infinite" and "fill the context") or None: until the context is full; clamped to its room
    num_predict: int_in(1, MAX_INT32, -1, -2, meaning="(until the context is full)") | None = None
    num_ctx: int_in(MIN_CONTEXT, MAX_INT32) | None = None  # clamped to the model's context length
    stop: list[str] | str | None = None
    repeat_last_n: int | None = Field(None, ge=-1)  # -1: the whole context; 0: no penalty
    repeat_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)  # logits are divided by it; 1: none
    # Ollama's other options, ignored: each in the range that means something to llama.cpp.
    num_keep: int | None = Field(None, ge=-1)  # -1: the whole prompt
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    tfs_z: float | None = Field(None, gt=0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    penalize_newline: bool | None = None
    mirostat: Literal[0, 1, 2] | None = None
    mirostat_tau: float | None = Field(None, ge=0, allow_inf_nan=False)
    mirostat_eta: float | None = Field(None, ge=0, allow_inf_nan=False)
    num_batch: int | None = Field(None, ge=1)
    num_gpu: int | None = Field(None, ge=-1)  # -1: as many layers as fit
    main_gpu: int | None = Field(None, ge=0)
    num_thread: int | None = Field(None, ge=0)  # 0: llama.cpp decides
    numa: bool | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None


def validation_message(errors: list[dict]) -> str:
    error = errors[0]
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
    return one_line(f"invalid request: {where}: {error.get('msg')}")


def parse_int(digits: str) -> int | float:
    """A JSON integer; a longer one than ``MAX_INT_DIGITS`` becomes a float (inf past 308 digits), which every
    integer field refuses with its name: Python would refuse to parse it at all past 4300 digits."""
    return int(digits) if len(digits) <= MAX_INT_DIGITS else float(digits)


def depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def json_body(body: bytes) -> dict:
    """The body as a JSON object (an empty body is ``{}``), or an ApiError(400) saying what is wrong."""
    too_deep = f"invalid request: the JSON body is nested deeper than {MAX_DEPTH} levels"
    try:
        data = json.loads(body or b"{}", parse_int=parse_int)
    except RecursionError:  # json's C parser recurses once per level
        raise ApiError(400, too_deep) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, one_line(f"invalid JSON in the request body: {exc}")) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"invalid request: the body must be a JSON object, got {type(data).__name__}")
    if depth(data) > MAX_DEPTH:  # validating (and the messages quoting) such a body could recurse too
        raise ApiError(400, too_deep)
    return data


async def parse(http: Request, schema: type[BaseModel]) -> Any:
    """The JSON body as ``schema``, whatever the Content-Type (Ollama clients do not all send one)."""
    data = json_body(await http.body())
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc.errors())) from None
