"""`python -m pipeline serve`: our models behind the Ollama HTTP API, for any Ollama client.

The server process and its app: one FastAPI app answers the Ollama API (pipeline/serve/ollama_api.py), its
embedding routes (pipeline/serve/embed_api.py), the OpenAI-compatible ``/v1`` routes (pipeline/serve/openai_api.py)
and, at ``/``, "Ollama is running" (a browser gets the chat page, pipeline/serve/chat_page.py). Around every route:
the API-key check and a count of requests by path in ``app.state.requests``. This module owns the command line
(which models, which socket); generation lives in pipeline/serve/engine.py.
"""

from __future__ import annotations

import argparse
import collections
import os
import secrets
import socket
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from pipeline.common.errors import PipelineError
from pipeline.serve import embed_api, ollama_api, openai_api, tokenize_api
from pipeline.serve.chat_page import add_card_route, chat_page, wants_html
from pipeline.serve.engine import Engine
from pipeline.serve.openai_api import OpenAIError
from pipeline.serve.request_parsing import ApiError
from pipeline.serve.served_model import ServedModel, load_model_dir

STANDARD_MODELS = ("base", "sft", "dpo", "onnx", "onnx-int8")


# ---------------------------------------------------------------------------------------------- the app


class RequestCounter:
    """Counts every HTTP request by path (what the tests read to prove a cached rerun sends nothing)."""

    def __init__(self, app, counter: collections.Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.counter[scope["path"]] += 1
        await self.app(scope, receive, send)


class ApiKey:
    """With a key configured, every route but ``/`` needs ``Authorization: Bearer <key>``; a 401 otherwise,
    in OpenAI's error shape under ``/v1`` and Ollama's elsewhere. (Without a key, the header is ignored.)"""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        message = "invalid or missing API key (send Authorization: Bearer <key>)"
        body = (
            OpenAIError(401, message, code="invalid_api_key").body()
            if scope["path"].startswith("/v1/")
            else {"error": message}
        )
        await JSONResponse(body, status_code=401)(scope, receive, send)


def create_app(
    models: dict[str, ServedModel], concurrency: int = 2, max_queue: int = 256, api_key: str | None = None
) -> FastAPI:
    """The Ollama-compatible API over ``models`` (keyed by their ``name:tag``), its embedding routes and the
    OpenAI-compatible ``/v1`` routes. With ``api_key``, every route but ``/`` needs ``Authorization: Bearer <api_key>``."""
    app = FastAPI(
        title="llm-pipeline (Ollama API)", version=ollama_api.VERSION, docs_url=None, redoc_url=None
    )
    engine = Engine(models, concurrency, max_queue)
    app.state.requests = collections.Counter()
    app.state.engine = engine

    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    app.add_middleware(RequestCounter, counter=app.state.requests)
    ollama_api.register(app, engine)
    embed_api.register(app, engine)
    openai_api.register(app, engine)
    tokenize_api.register(app, engine)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root(http: Request):
        return chat_page() if wants_html(http) else PlainTextResponse("Ollama is running")

    add_card_route(app, engine.model)
    return app


# ---------------------------------------------------------------------------------------------- command line


def load_models(
    specs: list[str], models_dir: str | Path = "models", threads: int | None = None
) -> dict[str, ServedModel]:
    """``NAME`` (models/NAME; ``onnx-int8`` is the int8 variant of models/onnx) or ``NAME=DIRECTORY``.

    With no specs, every standard model that exists under ``models_dir`` is served. ``threads``: onnxruntime's
    intra-op threads per session.
    """
    from pipeline.export.onnx_generate import VARIANT_FILES

    models_dir = Path(models_dir)
    if not specs:
        specs = [n for n in ("base", "sft", "dpo", "onnx") if (models_dir / n).is_dir()]
        if (models_dir / "onnx" / VARIANT_FILES["int8"]).is_file():
            specs.append("onnx-int8")
        if not specs:
            raise PipelineError(
                f"{models_dir}/: no model directories to serve (run `dvc repro`, or pass "
                "--models NAME=DIRECTORY)"
            )
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
        raise PipelineError(
            f"serve: cannot listen on {host}:{port} ({exc.strerror}); is Ollama or another "
            "server already there? Pick another --port"
        ) from None
    return sock


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline serve", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=11434, help="port, 1-65535 (default 11434, Ollama's)")
    parser.add_argument(
        "--models",
        nargs="*",
        default=[],
        metavar="NAME[=DIR]",
        help=f"models to serve (default: those of {', '.join(STANDARD_MODELS)} under models/)",
    )
    parser.add_argument("--concurrency", type=int, default=2, help="generations at once (default 2)")
    parser.add_argument("--max-queue", type=int, default=256, help="requests that may wait (default 256)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LLM_PIPELINE_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' (default: $LLM_PIPELINE_API_KEY; none: no check)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
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
        print(
            f"warning: serving on {args.host}: anyone who can reach this address can use it (no authentication)",
            file=sys.stderr,
        )
    print(
        f"serving {', '.join(models)} at http://{args.host}:{sock.getsockname()[1]} (Ollama API; OpenAI's under /v1); Ctrl-C stops",
        file=sys.stderr,
    )
    app = create_app(models, args.concurrency, args.max_queue, args.api_key)
    uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)).run(sockets=[sock])
    return 0
