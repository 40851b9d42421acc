"""The chat page `serve` shows a browser at ``/``, and the model cards it displays beside the chat.

``/`` stays Ollama's root for API clients (they probe it for "Ollama is running"); a browser, which asks for
``text/html``, gets the page: one self-contained file shipped in the package (``pipeline/serve/chat.html``), which
talks to the same server's Ollama API, so it works offline.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from pipeline.serve.model_card import served_model_card


@cache
def page() -> str:
    return files("pipeline.serve").joinpath("chat.html").read_text(encoding="utf-8")


def wants_html(request: Request) -> bool:
    """A browser's navigation asks for text/html first; Ollama clients and curl send */* or nothing."""
    return "text/html" in request.headers.get("accept", "")


def chat_page() -> HTMLResponse:
    return HTMLResponse(page())


def add_card_route(app: FastAPI, find_model) -> None:
    """``GET /chat/card/{name}``: the card of a served model (404 for an unknown one, as the API answers)."""

    @app.get("/chat/card/{name}")
    async def card(name: str) -> JSONResponse:
        model = find_model(name)
        return JSONResponse(served_model_card(model.source, model.size, model.details.get("parameter_size")))
