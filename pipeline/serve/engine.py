"""The engine behind every route: a bounded pool of generations and embedding batches, off the event loop.

``--concurrency`` requests generate (or embed) at once, up to ``--max-queue`` more wait their turn (a 503
beyond). A generation is an async iterator of ("text", piece)… then ("done", final fields), an embedding batch
one of ("done", vectors); ``collect`` waits for either and cancels it when the client goes away, which stops the
worker at its next token or input. It knows no API's response shape (the Ollama and OpenAI modules shape them).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request

from pipeline.data.prompts import stop_id
from pipeline.model.sampling import SamplingOptions
from pipeline.serve.request_parsing import ApiError, Options
from pipeline.serve.served_model import Generated, ServedModel, fit_prompt, generate_text

Job = Callable[[Callable[[str], None], Callable[[], bool]], object]  # (emit text, cancelled?) → result

# Ollama's defaults, where a request leaves an option out; but no repeat penalty (Ollama's 1.1), as the exported
# Modelfile sets, so a model answers the same here and in Ollama.
DEFAULT_OPTIONS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.0, "repeat_last_n": 64}
CLIENT_CLOSED = 499  # nginx's "client closed request": logged, never read by anyone


class ClientClosed(Exception):
    """The client hung up before the whole answer was ready; its generation (or embedding batch) was cancelled."""


def sampling_options(options: Options, max_new_tokens: int, eos_id: int) -> SamplingOptions:
    merged = {
        **DEFAULT_OPTIONS,
        **options.model_dump(exclude_none=True, include=set(DEFAULT_OPTIONS)),
    }
    top_k = merged["top_k"]
    top_p = merged["top_p"] if merged["top_p"] < 1 else None
    seed = options.seed if options.seed is not None else secrets.randbits(63)
    return SamplingOptions(
        max_new_tokens=max_new_tokens,
        temperature=merged["temperature"],
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        seed=seed,
        repeat_penalty=merged["repeat_penalty"],
        repeat_last_n=merged["repeat_last_n"],
    )


def final_fields(generated: Generated, total_ns: int) -> dict:
    """The last response object's fields; ``context`` (prompt + answer ids) is for /api/generate only,
    ``stop_token`` (the id that ended it, or None) for the OpenAI routes' log-probabilities only."""
    return {
        "done": True,
        "done_reason": generated.done_reason,
        "total_duration": total_ns,
        "load_duration": 0,
        "prompt_eval_count": len(generated.prompt_ids),
        "prompt_eval_duration": generated.prompt_ns,
        "eval_count": len(generated.output_ids),
        "eval_duration": generated.eval_ns,
        "context": generated.prompt_ids + generated.output_ids,
        "stop_token": generated.stop_id,
    }


async def client_gone(http: Request) -> None:
    """Return when the client disconnects (the body has been read, so the next ASGI message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def collect(run: AsyncIterator, http: Request) -> tuple[str, dict | list | None]:
    """The whole answer of ``run`` and its final fields (an embedding batch: "" and its vectors); a client that
    hangs up first cancels the work (``ClientClosed``). The generation's own error is raised as it is."""
    pieces: list[str] = []
    final: dict | None = None

    async def drain() -> None:
        nonlocal final
        async for kind, payload in run:
            if kind == "text":
                pieces.append(payload)
            else:
                final = payload

    answer = asyncio.ensure_future(drain())
    gone = asyncio.ensure_future(client_gone(http))
    await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not answer.done():  # nobody is waiting for the answer: free the slot (the generator's finally)
        answer.cancel()
        await asyncio.gather(answer, return_exceptions=True)
        raise ClientClosed
    answer.result()
    return "".join(pieces), final


class Engine:
    """Runs generations in a bounded pool, for the models it serves (keyed by ``name:tag``)."""

    def __init__(self, models: dict[str, ServedModel], concurrency: int, max_queue: int):
        self.models = models
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="generate")
        self.slots = asyncio.Semaphore(concurrency)
        self.max_queue, self.waiting = max_queue, 0
        self.cancelled = 0  # generations and embedding batches stopped because their client went away

    def model(self, name: str) -> ServedModel:
        key = name if ":" in name else f"{name}:latest"
        if key not in self.models:
            raise ApiError(404, f'model "{name}" not found, try pulling it first')
        return self.models[key]

    def check_queue(self) -> None:
        if self.slots.locked() and self.waiting >= self.max_queue:
            raise ApiError(
                503,
                f"server busy: every generation slot is taken and {self.waiting} requests are "
                "already waiting (--max-queue)",
            )

    def start(self, model: ServedModel, prompt_ids: list[int], options: Options):
        """A generation, not yet running (503 when the queue is full): an async iterator of ("text", piece)…
        then ("done", final fields). ``num_predict`` is capped by the room the context leaves after the prompt."""
        self.check_queue()
        limit = min(model.context_length, options.num_ctx or model.context_length)
        prompt_ids, max_new = fit_prompt(prompt_ids, limit, options.num_predict)
        opts = sampling_options(options, max_new, stop_id(model.encoding, model.template))
        stops = [options.stop] if isinstance(options.stop, str) else options.stop or []
        return self._run(
            lambda emit, cancelled: generate_text(model, prompt_ids, opts, stops, emit, cancelled),
            final_fields,
        )

    def embed(self, model: ServedModel, inputs: list[list[int]]):
        """An embedding batch, not yet running (503 when the queue is full): an async iterator of one
        ("done", vectors), one per id list, computed one input at a time until the batch is cancelled."""
        self.check_queue()

        def job(_emit, cancelled) -> list[list[float]]:
            vectors = []
            for ids in inputs:
                if cancelled():  # the client left: the rest of the batch is nobody's
                    break
                vectors.append(model.tokens.embed(ids))
            return vectors

        return self._run(job, lambda vectors, _ns: vectors)

    async def _run(self, job: Job, finish: Callable[[object, int], object]):
        """Yield ("text", piece) for what ``job`` emits, then ("done", finish(its result, nanoseconds)); closing
        the iterator early (the client left, the server stops) tells the job to stop at its next check."""
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

            future = loop.run_in_executor(self.pool, job, emit, cancelled.is_set)
            future.add_done_callback(lambda _: queue.put_nowait(("end", None)))
            try:
                while (item := await queue.get())[0] == "text":
                    yield item
                result = await future
                yield "done", finish(result, int((loop.time() - start) * 1e9))
            finally:
                if not future.done():  # the client left (or the server stops) before the work was complete
                    cancelled.set()
                    self.cancelled += 1
                await asyncio.wait([future])
        finally:
            self.slots.release()
