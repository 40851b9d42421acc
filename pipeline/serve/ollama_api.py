"""Our models behind the Ollama HTTP API, for any Ollama client: the ``/api`` routes of ``python -m pipeline serve``.

Endpoints: ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``, ``/api/generate`` and ``/api/chat`` (NDJSON
streaming by default, one JSON object with ``"stream": false``). Errors come back as Ollama's do:
``{"error": "..."}`` with 400 (bad request, malformed JSON), 404 (unknown model, with Ollama's "try pulling it
first") or 503 (queue full). Generation goes through the shared ``Engine`` (pipeline/serve/engine.py); the app
around these routes is pipeline/serve/app.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from pipeline.common.errors import PipelineError, one_line
from pipeline.serve.engine import CLIENT_CLOSED, DEFAULT_OPTIONS, ClientClosed, Engine, collect
from pipeline.serve.request_parsing import ApiError, Options, parse
from pipeline.serve.served_model import ServedModel

try:
    VERSION = package_version("llm-pipeline")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    VERSION = "0.1.0+source"

# ---------------------------------------------------------------------------------------------- requests


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None


class OllamaRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    stream: StrictBool = True  # JSON true or false, not "yes"
    options: Options = Field(default_factory=Options)
    format: str | dict | None = None
    keep_alive: str | int | float | None = None
    think: bool | str | None = None


class ChatRequest(OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Any] | None = None


class GenerateRequest(OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: StrictBool = False
    suffix: str | None = None
    images: list[str] | None = None
    context: list[int] | None = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None  # older clients


# ---------------------------------------------------------------------------------------------- helpers


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def unsupported(request: OllamaRequest, model: ServedModel, extras: dict[str, object]) -> None:
    """Features our models do not have get a 400 naming them (rather than silently wrong output)."""
    name = model.name
    if request.format not in (None, ""):
        raise ApiError(400, f"model '{name}' cannot constrain its output: 'format' is not supported")
    if request.think not in (None, False):
        raise ApiError(400, f'"{name}" does not support thinking')
    for field, value in extras.items():
        if value:
            raise ApiError(400, f"model '{name}' does not support '{field}'")


Shape = Callable[[str, dict | None], dict]  # (text, final fields or None) → one response object


async def ndjson(run, shape: Shape):
    try:
        async for kind, payload in run:
            line = shape(payload, None) if kind == "text" else shape("", payload)
            yield json.dumps(line, ensure_ascii=False) + "\n"
    except Exception as exc:  # the headers are sent: report in the stream, as Ollama does
        yield json.dumps({"error": one_line(f"generation failed: {exc}")}) + "\n"


async def respond(
    engine: Engine,
    http: Request,
    model: ServedModel,
    prompt_ids: list[int],
    options: Options,
    stream: bool,
    shape: Shape,
) -> Response:
    """The generation as Ollama answers: NDJSON lines, or one object once the whole answer is there."""
    run = engine.start(model, prompt_ids, options)
    if stream:
        return StreamingResponse(ndjson(run, shape), media_type="application/x-ndjson")
    try:
        text, final = await collect(run, http)
    except ClientClosed:
        return Response(status_code=CLIENT_CLOSED)
    except Exception as exc:
        raise ApiError(500, f"generation failed: {exc}") from exc
    return JSONResponse(shape(text, final))


# ---------------------------------------------------------------------------------------------- the routes


def register(app: FastAPI, engine: Engine) -> None:
    """Add the ``/api`` routes to ``app``, answering from ``engine``."""
    models = engine.models

    @app.get("/api/version")
    async def version() -> dict:
        return {"version": VERSION}

    def listing(model: ServedModel) -> dict:
        return {
            "name": model.name,
            "model": model.name,
            "modified_at": model.modified_at,
            "size": model.size,
            "digest": model.digest,
            "details": model.details,
        }

    @app.get("/api/tags")
    async def tags() -> dict:
        return {"models": [listing(m) for m in models.values()]}

    @app.get("/api/ps")
    async def ps() -> dict:
        return {
            "models": [
                {
                    **listing(m),
                    "expires_at": "0001-01-01T00:00:00Z",
                    "size_vram": 0,
                    "context_length": m.context_length,
                }
                for m in models.values()
            ]
        }

    @app.post("/api/show")
    async def show(http: Request) -> dict:
        request = await parse(http, ShowRequest)
        if not (name := request.model or request.name):
            raise ApiError(400, "invalid request: model: field required")
        model = engine.model(name)
        return {
            "modelfile": f"# served by llm-pipeline\nFROM {model.source}\n",
            "parameters": "\n".join(f"{k} {v}" for k, v in DEFAULT_OPTIONS.items()),
            "template": model.template_name or "(raw text: no template)",
            "details": model.details,
            "model_info": model.info,
            "capabilities": ["completion"],
            "modified_at": model.modified_at,
        }

    @app.post("/api/chat")
    async def chat(http: Request):
        request = await parse(http, ChatRequest)
        model = engine.model(request.model)
        unsupported(
            request, model, {"tools": request.tools, "images": any(m.images for m in request.messages)}
        )
        created = now()

        def shape(text: str, final: dict | None) -> dict:
            final = {
                k: v for k, v in (final or {"done": False}).items() if k not in ("context", "stop_token")
            }
            return {
                "model": model.name,
                "created_at": created,
                "message": {"role": "assistant", "content": text},
                **final,
            }

        if not request.messages:  # Ollama: an empty chat loads the model
            return JSONResponse(shape("", {"done": True, "done_reason": "load"}))
        messages = [(m.role, m.content) for m in request.messages]
        if any(role == "tool" for role, _ in messages):
            raise ApiError(400, f"model '{model.name}' does not support tool messages")
        if messages[-1][0] != "user":
            raise ApiError(
                400,
                f"invalid request: messages: the last message must be the user's, got {messages[-1][0]!r}",
            )
        try:
            prompt_ids = model.chat_ids(messages)
        except PipelineError as exc:
            raise ApiError(400, one_line(str(exc))) from None
        if not prompt_ids:
            raise ApiError(400, "invalid request: messages: no text to continue (every content is empty)")
        return await respond(engine, http, model, prompt_ids, request.options, request.stream, shape)

    @app.post("/api/generate")
    async def generate(http: Request):
        request = await parse(http, GenerateRequest)
        model = engine.model(request.model)
        unsupported(request, model, {"suffix": request.suffix, "images": request.images})
        created = now()

        def shape(text: str, final: dict | None) -> dict:
            final = {k: v for k, v in (final or {"done": False}).items() if k != "stop_token"}
            return {"model": model.name, "created_at": created, "response": text, **final}

        if not request.prompt:  # Ollama: an empty prompt loads the model
            return JSONResponse(shape("", {"done": True, "done_reason": "load"}))
        if request.raw or model.template is None:
            system = f"{request.system}\n\n" if request.system and not request.raw else ""
            prompt_ids = model.encoding.encode_ordinary(system + request.prompt)
        else:
            turns = ([("system", request.system)] if request.system else []) + [("user", request.prompt)]
            prompt_ids = model.chat_ids(turns)
        prompt_ids = (request.context or []) + prompt_ids
        if any(not 0 <= t < model.encoding.n_vocab for t in prompt_ids):
            raise ApiError(
                400, f"invalid request: context: token ids must be in [0, {model.encoding.n_vocab})"
            )
        return await respond(engine, http, model, prompt_ids, request.options, request.stream, shape)
