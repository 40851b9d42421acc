"""`python -m pipeline serve`: our models behind the Ollama HTTP API, for any Ollama client.

Endpoints: ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``, ``/api/generate`` and ``/api/chat`` (NDJSON
streaming by default, one JSON object with ``"stream": false``), and ``/`` ("Ollama is running"; a browser gets
the chat page, pipeline/serve/chat_page.py). Errors come back
as Ollama's do: ``{"error": "..."}`` with 400 (bad request, malformed JSON), 404 (unknown model, with Ollama's
"try pulling it first") or 503 (queue full). The same server answers ``/api/embed`` and ``/api/embeddings``
(``pipeline.serve.embed_api``) and the OpenAI-compatible ``/v1`` routes (``pipeline.serve.openai_api``).

Generation runs in a bounded thread pool, off the event loop: ``--concurrency`` requests generate at once, up to
``--max-queue`` more wait their turn. Every request is counted by path in ``app.state.requests``.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import socket
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.common.errors import PipelineError, one_line
from pipeline.model.sampling import SamplingOptions
from pipeline.serve.chat_page import add_card_route, chat_page, wants_html
from pipeline.serve.served_model import Generated, ServedModel, fit_prompt, generate_text

try:
    VERSION = package_version("llm-pipeline")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    VERSION = "0.1.0+source"

# Ollama's defaults, where a request leaves an option out.
DEFAULT_OPTIONS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
STANDARD_MODELS = ("base", "sft", "dpo", "onnx", "onnx-int8")
MIN_CONTEXT = 2  # one prompt token and one answer token


# ---------------------------------------------------------------------------------------------- requests


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


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None


class OllamaRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    stream: bool = True
    options: Options = Field(default_factory=Options)
    format: str | dict | None = None
    keep_alive: str | int | float | None = None
    think: bool | str | None = None


class ChatRequest(OllamaRequest):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Any] | None = None


class GenerateRequest(OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    images: list[str] | None = None
    context: list[int] | None = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None  # older clients


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------- helpers

CLIENT_CLOSED = 499  # nginx's "client closed request": logged, never read by anyone


async def client_gone(http: Request) -> None:
    """Return when the client disconnects (the body has been read, so the next ASGI message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


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


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def sampling(options: Options, max_new_tokens: int, eos_id: int) -> SamplingOptions:
    merged = {**DEFAULT_OPTIONS, **options.model_dump(exclude_none=True, include={"temperature", "top_k", "top_p"})}
    top_k = merged["top_k"]
    top_p = merged["top_p"] if merged["top_p"] < 1 else None
    seed = options.seed if options.seed is not None else secrets.randbits(63)
    return SamplingOptions(max_new_tokens=max_new_tokens, temperature=merged["temperature"], top_k=top_k,
                           top_p=top_p, eos_id=eos_id, seed=seed)


def unsupported(request: OllamaRequest, model: ServedModel, extras: dict[str, object]) -> None:
    """Features our models do not have get a 400 naming them (rather than silently wrong output)."""
    name = model.name
    if request.format not in (None, ""):
        raise ApiError(400, f"model '{name}' cannot constrain its output: 'format' is not supported")
    if request.think not in (None, False):
        raise ApiError(400, f"\"{name}\" does not support thinking")
    for field, value in extras.items():
        if value:
            raise ApiError(400, f"model '{name}' does not support '{field}'")


def final_fields(generated: Generated, total_ns: int) -> dict:
    """The last response object's fields; ``context`` (prompt + answer ids) is for /api/generate only."""
    return {"done": True, "done_reason": generated.done_reason, "total_duration": total_ns, "load_duration": 0,
            "prompt_eval_count": len(generated.prompt_ids), "prompt_eval_duration": generated.prompt_ns,
            "eval_count": len(generated.output_ids), "eval_duration": generated.eval_ns,
            "context": generated.prompt_ids + generated.output_ids}


# ---------------------------------------------------------------------------------------------- the app


class RequestCounter:
    """Counts every HTTP request by path (what the tests read to prove a cached rerun sends nothing)."""

    def __init__(self, app, counter: collections.Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.counter[scope["path"]] += 1
        await self.app(scope, receive, send)


Shape = Callable[[str, dict | None], dict]  # (text, final fields or None) → one response object


class Engine:
    """Runs generations in a bounded pool and turns them into Ollama responses (streamed or whole)."""

    def __init__(self, models: dict[str, ServedModel], concurrency: int, max_queue: int):
        self.models = models
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="generate")
        self.slots = asyncio.Semaphore(concurrency)
        self.max_queue, self.waiting = max_queue, 0
        self.cancelled = 0  # generations stopped because their client went away

    def model(self, name: str) -> ServedModel:
        key = name if ":" in name else f"{name}:latest"
        if key not in self.models:
            raise ApiError(404, f"model \"{name}\" not found, try pulling it first")
        return self.models[key]

    async def respond(self, http: Request, model: ServedModel, prompt_ids: list[int], options: Options, stream: bool,
                      shape: Shape) -> Response:
        run = self.start(model, prompt_ids, options)
        if stream:
            return StreamingResponse(self._ndjson(run, shape), media_type="application/x-ndjson")
        collect = asyncio.ensure_future(self._collect(run))
        gone = asyncio.ensure_future(client_gone(http))
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not collect.done():  # nobody is waiting for the answer: free the slot (the generator's finally)
            collect.cancel()
            await asyncio.gather(collect, return_exceptions=True)
            return Response(status_code=CLIENT_CLOSED)
        try:
            text, final = collect.result()
        except Exception as exc:
            raise ApiError(500, f"generation failed: {exc}") from exc
        return JSONResponse(shape(text, final))

    @staticmethod
    async def _collect(run) -> tuple[str, dict | None]:
        pieces, final = [], None
        async for kind, payload in run:
            if kind == "text":
                pieces.append(payload)
            else:
                final = payload
        return "".join(pieces), final

    def start(self, model: ServedModel, prompt_ids: list[int], options: Options):
        """A generation, not yet running (503 when the queue is full): an async iterator of ("text", piece)…
        then ("done", final fields). ``num_predict`` is capped by the room the context leaves after the prompt."""
        if self.slots.locked() and self.waiting >= self.max_queue:
            raise ApiError(503, f"server busy: every generation slot is taken and {self.waiting} requests are "
                                "already waiting (--max-queue)")
        limit = min(model.context_length, options.num_ctx or model.context_length)
        prompt_ids, max_new = fit_prompt(prompt_ids, limit, options.num_predict)
        opts = sampling(options, max_new, model.encoding.eot_token)
        stops = [options.stop] if isinstance(options.stop, str) else options.stop or []
        return self._run(model, prompt_ids, opts, stops)

    @staticmethod
    async def _ndjson(run, shape: Shape):
        try:
            async for kind, payload in run:
                line = shape(payload, None) if kind == "text" else shape("", payload)
                yield json.dumps(line, ensure_ascii=False) + "\n"
        except Exception as exc:  # the headers are sent: report in the stream, as Ollama does
            yield json.dumps({"error": one_line(f"generation failed: {exc}")}) + "\n"

    async def _run(self, model: ServedModel, prompt_ids: list[int], opts: SamplingOptions, stops: list[str]):
        """Yield ("text", piece)… then ("done", final fields); a client that goes away cancels the generation."""
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        try:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            cancelled = threading.Event()
            start = loop.time()

            def emit(text: str) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, ("text", text))

            future = loop.run_in_executor(
                self.pool, lambda: generate_text(model, prompt_ids, opts, stops, emit, cancelled.is_set)
            )
            future.add_done_callback(lambda _: queue.put_nowait(("end", None)))
            try:
                while (item := await queue.get())[0] == "text":
                    yield item
                generated = await future
                yield "done", final_fields(generated, int((loop.time() - start) * 1e9))
            finally:
                if not future.done():  # the client left (or the server stops) before the answer was complete
                    cancelled.set()
                    self.cancelled += 1
                await asyncio.wait([future])
        finally:
            self.slots.release()


def create_app(models: dict[str, ServedModel], concurrency: int = 2, max_queue: int = 256,
               api_key: str | None = None) -> FastAPI:
    """The Ollama-compatible API over ``models`` (keyed by their ``name:tag``), its embedding routes
    (``pipeline.serve.embed_api``) and the OpenAI-compatible ``/v1`` routes (``pipeline.serve.openai_api``).
    With ``api_key``, every route but ``/`` needs ``Authorization: Bearer <api_key>``."""
    from pipeline.serve import embed_api, openai_api

    app = FastAPI(title="llm-pipeline (Ollama API)", version=VERSION, docs_url=None, redoc_url=None)
    engine = Engine(models, concurrency, max_queue)
    app.state.requests = collections.Counter()
    app.state.engine = engine

    if api_key:
        app.add_middleware(openai_api.ApiKey, key=api_key)
    app.add_middleware(RequestCounter, counter=app.state.requests)
    embed_api.register(app, engine)
    openai_api.register(app, engine)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root(http: Request):
        return chat_page() if wants_html(http) else PlainTextResponse("Ollama is running")

    add_card_route(app, engine.model)

    @app.get("/api/version")
    async def version() -> dict:
        return {"version": VERSION}

    def listing(model: ServedModel) -> dict:
        return {"name": model.name, "model": model.name, "modified_at": model.modified_at, "size": model.size,
                "digest": model.digest, "details": model.details}

    @app.get("/api/tags")
    async def tags() -> dict:
        return {"models": [listing(m) for m in models.values()]}

    @app.get("/api/ps")
    async def ps() -> dict:
        return {"models": [{**listing(m), "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0,
                            "context_length": m.context_length} for m in models.values()]}

    @app.post("/api/show")
    async def show(http: Request) -> dict:
        request = await parse(http, ShowRequest)
        if not (name := request.model or request.name):
            raise ApiError(400, "invalid request: model: field required")
        model = engine.model(name)
        return {"modelfile": f"# served by llm-pipeline\nFROM {model.source}\n",
                "parameters": "\n".join(f"{k} {v}" for k, v in DEFAULT_OPTIONS.items()),
                "template": model.template or "(raw text: no template)", "details": model.details,
                "model_info": model.info, "capabilities": ["completion"], "modified_at": model.modified_at}

    @app.post("/api/chat")
    async def chat(http: Request):
        request = await parse(http, ChatRequest)
        model = engine.model(request.model)
        unsupported(request, model, {"tools": request.tools,
                                     "images": any(m.images for m in request.messages)})
        created = now()

        def shape(text: str, final: dict | None) -> dict:
            final = {k: v for k, v in (final or {"done": False}).items() if k != "context"}
            return {"model": model.name, "created_at": created,
                    "message": {"role": "assistant", "content": text}, **final}

        if not request.messages:  # Ollama: an empty chat loads the model
            return JSONResponse(shape("", {"done": True, "done_reason": "load"}))
        messages = [(m.role, m.content) for m in request.messages]
        if any(role == "tool" for role, _ in messages):
            raise ApiError(400, f"model '{model.name}' does not support tool messages")
        if messages[-1][0] != "user":
            raise ApiError(400, f"invalid request: messages: the last message must be the user's, "
                                f"got {messages[-1][0]!r}")
        try:
            prompt_ids = model.chat_ids(messages)
        except PipelineError as exc:
            raise ApiError(400, one_line(str(exc))) from None
        if not prompt_ids:
            raise ApiError(400, "invalid request: messages: no text to continue (every content is empty)")
        return await engine.respond(http, model, prompt_ids, request.options, request.stream, shape)

    @app.post("/api/generate")
    async def generate(http: Request):
        request = await parse(http, GenerateRequest)
        model = engine.model(request.model)
        unsupported(request, model, {"suffix": request.suffix, "images": request.images})
        created = now()

        def shape(text: str, final: dict | None) -> dict:
            return {"model": model.name, "created_at": created, "response": text, **(final or {"done": False})}

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
            raise ApiError(400, f"invalid request: context: token ids must be in [0, {model.encoding.n_vocab})")
        return await engine.respond(http, model, prompt_ids, request.options, request.stream, shape)

    return app


# ---------------------------------------------------------------------------------------------- command line


def load_models(specs: list[str], models_dir: str | Path = "models", threads: int | None = None
                ) -> dict[str, ServedModel]:
    """``NAME`` (models/NAME; ``onnx-int8`` is the int8 variant of models/onnx) or ``NAME=DIRECTORY``.

    With no specs, every standard model that exists under ``models_dir`` is served. ``threads``: onnxruntime's
    intra-op threads per session.
    """
    from pipeline.export.onnx_generate import VARIANT_FILES
    from pipeline.serve.served_model import load_model_dir

    models_dir = Path(models_dir)
    if not specs:
        specs = [n for n in ("base", "sft", "dpo", "onnx") if (models_dir / n).is_dir()]
        if (models_dir / "onnx" / VARIANT_FILES["int8"]).is_file():
            specs.append("onnx-int8")
        if not specs:
            raise PipelineError(f"{models_dir}/: no model directories to serve (run `dvc repro`, or pass "
                                "--models NAME=DIRECTORY)")
    loaded: dict[str, ServedModel] = {}
    for spec in specs:
        name, _, directory = spec.partition("=")
        if not name or any(c.isspace() or c == "/" for c in name):
            raise PipelineError(f"--models {spec!r}: a model name must be non-empty, without spaces or '/'")
        variant = "int8" if name.endswith("-int8") else "fp32"
        path = Path(directory) if directory else models_dir / name.removesuffix("-int8")
        key = name if ":" in name else f"{name}:latest"
        loaded[key] = load_model_dir(key, path, variant, threads)
    return loaded


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts so a busy port is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PipelineError(f"serve: cannot listen on {host}:{port} ({exc.strerror}); is Ollama or another "
                            "server already there? Pick another --port") from None
    return sock


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=11434, help="port, 1-65535 (default 11434, Ollama's)")
    parser.add_argument("--models", nargs="*", default=[], metavar="NAME[=DIR]",
                        help=f"models to serve (default: those of {', '.join(STANDARD_MODELS)} under models/)")
    parser.add_argument("--concurrency", type=int, default=2, help="generations at once (default 2)")
    parser.add_argument("--max-queue", type=int, default=256, help="requests that may wait (default 256)")
    parser.add_argument("--api-key", default=os.environ.get("LLM_PIPELINE_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' (default: $LLM_PIPELINE_API_KEY; none: no check)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        raise PipelineError(f"serve: --port must be in 1-65535, got {args.port}")
    if args.concurrency < 1 or args.max_queue < 0:
        raise PipelineError("serve: --concurrency must be >= 1 and --max-queue >= 0")
    # Each concurrent generation gets its share of the cores (more threads than cores only contend).
    threads = max(1, len(os.sched_getaffinity(0)) // args.concurrency)
    models = load_models(args.models, threads=threads)
    sock = bind(args.host, args.port)
    if "torch" in sys.modules:  # torch models are served (the ONNX path need not import it)
        sys.modules["torch"].set_num_threads(threads)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host}: anyone who can reach this address can use it (no authentication)",
              file=sys.stderr)
    print(f"serving {', '.join(models)} at http://{args.host}:{sock.getsockname()[1]} (Ollama API; OpenAI's under /v1); Ctrl-C stops",
          file=sys.stderr)
    app = create_app(models, args.concurrency, args.max_queue, args.api_key)
    uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)).run(sockets=[sock])
    return 0
