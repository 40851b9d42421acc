"""The OpenAI-compatible routes of ``python -m pipeline serve``, as Ollama serves them under ``/v1``.

``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/chat/completions``, ``POST /v1/completions`` and
``POST /v1/embeddings``. Generation goes through the same ``Engine`` as the Ollama routes (one pool, one queue,
one KV-cache generator); streaming is Server-Sent Events: ``data: {chunk}`` lines ending with ``data: [DONE]``.

What is honoured: ``max_tokens`` / ``max_completion_tokens`` (capped by the room the context leaves after the
prompt), ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``, ``stream_options.include_usage``; unset options
take Ollama's defaults (temperature 0.8, top_p 0.9, top_k 40). A field we do not implement that carries a value
other than its default (``n`` > 1, ``tools``, ``response_format`` other than text, chat ``logprobs``, penalties,
image parts, or any field we do not know) gets a 400 in OpenAI's error shape naming it, never a silent ignore.

``/v1/completions`` also honours the legacy ``logprobs`` (0..5: the top-k log-probabilities at each generated
token) and ``echo`` (the prompt comes back in ``text``, its tokens scored; ``max_tokens: 0`` generates nothing),
in OpenAI's ``choices[i].logprobs = {tokens, token_logprobs, top_logprobs, text_offset}`` shape, the first prompt
token's log-probability null. This is what lm-evaluation-harness's ``local-completions`` scores with. An echoed
text prompt is scored as raw text (no chat template: the text is what is measured) and must fit the context
whole. Log-probabilities are the model's own (temperature 1, no top-k/top-p), whatever sampling produced the
tokens; they are torch models' only (the ONNX export answers 400) and are not streamed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import struct
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, ValidationError, field_validator

from pipeline.common.errors import PipelineError, one_line
from pipeline.serve.embed_api import check_count, embed_all, embedding_ids
from pipeline.serve.engine import ClientClosed, Engine, collect
from pipeline.serve.request_parsing import MAX_INT32, ApiError, Options, int_in, json_body
from pipeline.serve.served_model import ServedModel, fit_prompt

SYSTEM_FINGERPRINT = "fp_llm_pipeline"
MAX_LOGPROBS = 5  # OpenAI's cap on the legacy completions' top-k

# Fields we accept only with these values: what official clients send when the feature is not asked for.
DEFAULT_ONLY: dict[str, tuple] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}
# Fields with no effect on output, accepted when of OpenAI's type.
IGNORED: dict[str, type] = {
    "user": str,
    "store": bool,
    "metadata": dict,
    "service_tier": str,
    "safety_identifier": str,
    "prompt_cache_key": str,
}


class OpenAIError(Exception):
    """An error as OpenAI's API reports it: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}.get(
            self.status, "invalid_request_error"
        )
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None


class CompletionFields(BaseModel):
    """The fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    stream: StrictBool | None = False  # JSON true or false, not "yes"
    stream_options: StreamOptions | None = None
    max_tokens: int_in(1, MAX_INT32) | None = None
    temperature: StrictFloat | None = Field(None, ge=0, le=2)  # a JSON number, not "0.7"
    top_p: StrictFloat | None = Field(
        None, gt=0, le=1
    )  # as the Ollama routes' options: refused, not a 5xx, outside
    seed: int_in(0, 2**64 - 1) | None = None
    stop: str | list[str] | None = None

    def options(self, max_tokens: int | None = None) -> Options:
        return Options(
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            num_predict=max_tokens or self.max_tokens,
            stop=self.stop,
        )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatCompletionRequest(CompletionFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int_in(1, MAX_INT32) | None = None


class CompletionRequest(CompletionFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int_in(0, MAX_INT32) | None = None  # 0 only with echo: score the prompt, generate nothing
    logprobs: int | None = None
    echo: StrictBool | None = None

    @field_validator("logprobs", mode="before")
    @classmethod
    def top_logprobs_count(cls, value: Any) -> int | None:
        """An int 0..5; false (what clients send when they ask for none) is None; true or "3" is refused."""
        if value is None or value is False:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
            raise ValueError(f"must be an integer from 0 to {MAX_LOGPROBS}, got {json.dumps(value)}")
        return value

    @property
    def top_k(self) -> int | None:
        """How many likeliest tokens to report per position; None when no log-probabilities are asked for."""
        return self.logprobs


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int_in(1, MAX_INT32) | None = None


def param_of(loc: tuple) -> str:
    """Pydantic's location as OpenAI names a param: ``messages[0].role`` (union members' tags left out)."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part != "body" and "[" not in part and part not in ("str", "int", "float", "bool"):
            name += f".{part}" if name else part
    return name or "body"


async def parse(http: Request, schema: type[BaseModel]) -> Any:
    """The JSON body as ``schema``; a field present with a value we cannot honour is a 400 naming it."""
    try:
        data = json_body(await http.body())
    except ApiError as exc:
        raise OpenAIError(exc.status, str(exc)) from None
    try:
        request = schema.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = param_of(error.get("loc", ()))
        raise OpenAIError(400, one_line(f"invalid request: {param}: {error.get('msg')}"), param) from None
    for field, value in (request.model_extra or {}).items():
        if value is None:
            continue
        if field in IGNORED:
            if not isinstance(value, IGNORED[field]):
                wanted = {str: "a string", bool: "true or false", dict: "an object"}[IGNORED[field]]
                message = f"invalid request: {field}: must be {wanted}, got {type(value).__name__}"
                raise OpenAIError(400, message, field)
            continue
        if field not in DEFAULT_ONLY:
            raise OpenAIError(400, f"unsupported field '{field}': this server does not implement it", field)
        if value not in DEFAULT_ONLY[field]:
            accepted = " or ".join(json.dumps(v) for v in DEFAULT_ONLY[field] if v is not None) or "null"
            raise OpenAIError(
                400,
                f"unsupported field '{field}': this server does not implement it (accepted: {accepted})",
                field,
            )
    return request


def find_model(engine: Engine, name: str) -> ServedModel:
    try:
        return engine.model(name)
    except ApiError as exc:
        raise OpenAIError(404, f"The model '{name}' does not exist", "model", "model_not_found") from exc


def text_of(message: ChatMessage, index: int) -> str:
    """A message's text; content parts other than text (images, audio, files) are refused."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for j, part in enumerate(message.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            where = f"messages[{index}].content[{j}]"
            raise OpenAIError(
                400, f"{where}: unsupported content part of type {part.get('type')!r} (text only)", where
            )
        texts.append(part["text"])
    return "".join(texts)


def chat_turns(request: ChatCompletionRequest) -> list[tuple[str, str]]:
    turns = []
    for i, message in enumerate(request.messages):
        if message.role == "tool" or (message.model_extra or {}).get("tool_calls"):
            raise OpenAIError(
                400,
                f"messages[{i}]: unsupported tool message (this server does not implement tools)",
                f"messages[{i}]",
            )
        turns.append(("system" if message.role == "developer" else message.role, text_of(message, i)))
    if turns[-1][0] != "user":
        raise OpenAIError(
            400, f"messages: the last message must be the user's, got {turns[-1][0]!r}", "messages"
        )
    return turns


def completion_prompt(model: ServedModel, prompt: str | list, raw: bool = False) -> list[int]:
    """Text is rendered as /api/generate renders it (the model's template, as Ollama does) unless ``raw``
    (an echoed prompt is scored as the text it is); ids pass as they are."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str):  # a batch of prompts
        if len(prompt) != 1:
            raise OpenAIError(
                400, "prompt: several prompts in one request are not supported (send one)", "prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt or any(not 0 <= t < model.encoding.n_vocab for t in prompt):
            raise OpenAIError(
                400, f"prompt: token ids must be non-empty and in [0, {model.encoding.n_vocab})", "prompt"
            )
        return list(prompt)
    if not prompt:
        raise OpenAIError(400, "prompt: empty", "prompt")
    if model.template and not raw:
        return model.chat_ids([("user", prompt)])
    return model.encoding.encode_ordinary(prompt)


def token_text(model: ServedModel, token: int) -> str:
    """A token as OpenAI lists it: its text, or ``bytes:\\xNN…`` for a piece of a UTF-8 character."""
    raw = model.encoding.decode_single_token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def logprobs_object(model: ServedModel, ids: list[int], shown: int, scored, k: int) -> dict:
    """OpenAI's legacy ``logprobs`` for the last ``shown`` of ``ids`` (``scored`` covers ids[1:]); the first id
    has no log-probability (null); ``text_offset`` is where each token starts in the returned text."""
    first = len(ids) - shown
    tokens, logprobs, tops, offsets = [], [], [], []
    for i in range(first, len(ids)):
        tokens.append(token_text(model, ids[i]))
        offsets.append(len(model.encoding.decode_bytes(ids[first:i]).decode("utf-8", errors="replace")))
        if i == 0:
            logprobs.append(None)
            tops.append(None)
            continue
        logprobs.append(scored.logprobs[i - 1])
        top: dict[str, float] = {}
        for token, value in scored.top[i - 1][:k]:
            top.setdefault(
                token_text(model, token), value
            )  # two byte pieces may print alike: keep the likelier
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def usage(final: dict) -> dict:
    prompt, completion = final["prompt_eval_count"], final["eval_count"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(final: dict) -> str:
    return "length" if final["done_reason"] == "length" else "stop"


# ---------------------------------------------------------------------------------------------- responses

# (piece of text or None, final fields or None) → one choice object
Choice = Callable[[str | None, dict | None], dict]


async def complete(run: AsyncIterator, http: Request) -> tuple[str, dict]:
    """The whole answer (``engine.collect``), its failures in OpenAI's error shape."""
    try:
        return await collect(run, http)
    except ClientClosed:
        raise OpenAIError(499, "client closed the request") from None
    except PipelineError as exc:
        raise OpenAIError(400, one_line(str(exc))) from None


async def sse(run: AsyncIterator, head: dict, choice: Choice, include_usage: bool) -> AsyncIterator[str]:
    """``data: chunk`` events; the last chunk carries ``finish_reason``, then usage (if asked) and ``[DONE]``."""
    extra = {"usage": None} if include_usage else {}

    def event(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        async for kind, payload in run:
            if kind == "text":
                yield event({**head, "choices": [choice(payload, None)], **extra})
            else:
                yield event({**head, "choices": [choice(None, payload)], **extra})
                if include_usage:
                    yield event({**head, "choices": [], "usage": usage(payload)})
    except Exception as exc:  # the headers are sent: report in the stream
        yield event({"error": OpenAIError(500, one_line(f"generation failed: {exc}")).body()["error"]})
    yield "data: [DONE]\n\n"


def stream_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def start(engine: Engine, model: ServedModel, prompt_ids: list[int], options: Options) -> AsyncIterator:
    try:
        return engine.start(model, prompt_ids, options)
    except ApiError as exc:
        raise OpenAIError(exc.status, str(exc)) from None


# ---------------------------------------------------------------------------------------------- the routes


def register(app: FastAPI, engine: Engine) -> None:
    """Add the ``/v1`` routes to ``app`` (pipeline/serve/app.py), answering from ``engine``."""

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    def card(model: ServedModel) -> dict:
        created = int(datetime.fromisoformat(model.modified_at).timestamp())
        return {"id": model.name, "object": "model", "created": created, "owned_by": "llm-pipeline"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card(m) for m in engine.models.values()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        return card(find_model(engine, name))

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        request = await parse(http, ChatCompletionRequest)
        served = find_model(engine, request.model)
        turns = chat_turns(request)
        try:
            prompt_ids = served.chat_ids(turns)
        except PipelineError as exc:
            raise OpenAIError(400, one_line(str(exc)), "messages") from None
        run = start(engine, served, prompt_ids, request.options(request.max_completion_tokens))
        head = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "created": int(time.time()),
            "model": served.name,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if request.stream:
            sent_role = False

            def choice(text: str | None, final: dict | None) -> dict:
                nonlocal sent_role
                delta = {} if text is None else {"content": text}
                if not sent_role:
                    delta, sent_role = {"role": "assistant", **delta}, True
                return {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish_reason(final) if final else None,
                }

            include = bool(request.stream_options and request.stream_options.include_usage)
            return stream_response(sse(run, {**head, "object": "chat.completion.chunk"}, choice, include))
        text, final = await complete(run, http)
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish_reason(final),
                }
            ],
            "usage": usage(final),
        }

    async def scored_completion(
        request: CompletionRequest, served: ServedModel, http: Request, head: dict
    ) -> dict:
        """A completion with ``logprobs`` and/or ``echo``: generate (unless max_tokens is 0), then score the
        prompt and answer in one forward pass, in the generation pool."""
        if request.stream:
            raise OpenAIError(
                400, "logprobs and echo are not streamed by this server: send stream: false", "stream"
            )
        param = "echo" if request.echo else "logprobs"
        if not served.scores:
            raise OpenAIError(
                400,
                f"model '{served.name}' does not report log-probabilities (only torch model "
                "directories do; the ONNX export does not)",
                param,
            )
        prompt_ids = completion_prompt(served, request.prompt, raw=bool(request.echo))
        kept = (
            prompt_ids[-served.context_length :]
            if request.max_tokens == 0
            else fit_prompt(prompt_ids, served.context_length, request.max_tokens)[0]
        )
        if request.echo and len(kept) < len(prompt_ids):
            raise OpenAIError(
                400,
                f"prompt: {len(prompt_ids)} tokens do not fit the context of "
                f"{served.context_length} with max_tokens {request.max_tokens} (echo scores the "
                "whole prompt)",
                "prompt",
            )
        if request.max_tokens == 0:
            text, final = (
                "",
                {
                    "prompt_eval_count": len(prompt_ids),
                    "eval_count": 0,
                    "done_reason": "length",
                    "context": prompt_ids,
                },
            )
        else:
            text, final = await complete(start(engine, served, prompt_ids, request.options()), http)
        # The token that ended the answer is listed and scored too: the harness reads every token but the last.
        ids, n_prompt = (
            final["context"] + [t for t in [final.get("stop_token")] if t is not None],
            final["prompt_eval_count"],
        )
        shown = len(ids) if request.echo else len(ids) - n_prompt
        k = request.top_k or 0
        scored = None
        if len(ids) >= 2:
            async with engine.slots:  # a forward pass is generation work: it takes one of the pool's slots
                loop = asyncio.get_running_loop()
                scored = await loop.run_in_executor(engine.pool, lambda: served.tokens.score(ids, k))
        logprobs = (
            logprobs_object(served, ids, shown, scored, k)
            if request.top_k is not None or request.echo
            else None
        )
        if request.echo:
            text = served.encoding.decode(ids[:n_prompt]) + text
        return {
            **head,
            "choices": [
                {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(final)}
            ],
            "usage": usage(final),
        }

    @app.post("/v1/completions")
    async def completions(http: Request):
        request = await parse(http, CompletionRequest)
        served = find_model(engine, request.model)
        if request.max_tokens == 0 and not request.echo:
            raise OpenAIError(400, "invalid request: max_tokens: 0 is allowed with echo only", "max_tokens")
        if request.top_k is not None or request.echo:
            head = {
                "id": f"cmpl-{secrets.token_hex(12)}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": served.name,
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
            return await scored_completion(request, served, http, head)
        run = start(engine, served, completion_prompt(served, request.prompt), request.options())
        head = {
            "id": f"cmpl-{secrets.token_hex(12)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": served.name,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if request.stream:

            def choice(text: str | None, final: dict | None) -> dict:
                return {
                    "index": 0,
                    "text": text or "",
                    "logprobs": None,
                    "finish_reason": finish_reason(final) if final else None,
                }

            include = bool(request.stream_options and request.stream_options.include_usage)
            return stream_response(sse(run, head, choice, include))
        text, final = await complete(run, http)
        return {
            **head,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(final)}],
            "usage": usage(final),
        }

    @app.post("/v1/embeddings")
    async def embeddings(http: Request) -> dict:
        request = await parse(http, EmbeddingRequest)
        served = find_model(engine, request.model)
        items = request.input
        if isinstance(items, str) or (items and isinstance(items[0], int)):
            items = [items]
        if not items:
            raise OpenAIError(400, "the input is empty", "input")
        try:
            check_count(len(items))
        except ApiError as exc:
            raise OpenAIError(400, str(exc), "input") from None
        ids = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                ids.append(embedding_ids(served, item))
            elif any(not 0 <= t < served.encoding.n_vocab for t in item):
                raise OpenAIError(400, f"token ids must be in [0, {served.encoding.n_vocab})", f"input[{i}]")
            else:
                ids.append(item[: served.context_length])
        try:
            vectors = await embed_all(engine, http, served, ids)
        except ClientClosed:
            raise OpenAIError(499, "client closed the request") from None
        except ApiError as exc:
            raise OpenAIError(exc.status, str(exc), "input" if "input" in str(exc) else "model") from None
        if request.dimensions is not None and request.dimensions != len(vectors[0]):
            raise OpenAIError(
                400,
                f"model '{served.name}' embeds into {len(vectors[0])} dimensions; other "
                "'dimensions' are not supported",
                "dimensions",
            )
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
                if request.encoding_format == "base64"
                else v,
            }
            for i, v in enumerate(vectors)
        ]
        tokens = sum(map(len, ids))
        return {
            "object": "list",
            "data": data,
            "model": served.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
