"""Test helpers: tiny char-level models saved as real model directories, and our Ollama server in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn

from pipeline.data.tokenizer import save_tokenizer, train_char
from pipeline.model.checkpoint import save_model
from pipeline.model.gpt import GPT, config_from_preset
from pipeline.serve.app import bind, create_app
from pipeline.serve.served_model import ServedModel, load_model_dir


def save_tiny_model(
    directory: Path,
    template: str | None = "alpaca",
    context_length: int = 64,
    seed: int = 0,
    examples: Sequence[tuple[list[int], list[int]]] = (),
    steps: int = 0,
    **shape: object,
) -> Path:
    """A cpu-tiny GPT (``shape``: fields replaced, e.g. a Llama family's) over a byte-level tokenizer, saved with
    ``save_model``; with ``examples`` (prompt ids, answer ids) it is first trained ``steps`` full-batch steps to
    give those answers."""
    enc = train_char([], 256 + 16)
    tokenizer_dir = directory.parent / f"{directory.name}-tokenizer"
    fingerprint = save_tokenizer(enc, tokenizer_dir, "char")
    torch.manual_seed(seed)
    model = GPT(
        config_from_preset("cpu-tiny", vocab_size=enc.n_vocab, context_length=context_length, **shape)
    )
    if examples:
        train_answers(model, examples, steps)
    meta = {"tokenizer": {"path": str(tokenizer_dir), "fingerprint": fingerprint}}
    if template is not None:  # as the sft/dpo stages record their recipe
        meta["instructions"] = {"template": template}
    save_model(directory, model, **meta)
    return directory


def save_answering_model(
    directory: Path,
    answers: dict[str, str],
    context_length: int = 96,
    template: str = "alpaca",
    steps: int = 150,
) -> Path:
    """A tiny model trained to answer each question of ``answers`` (one user message) with its answer."""
    from pipeline.data.prompts import chat_prompt_ids, encode_response
    from pipeline.serve.served_model import fit_prompt

    enc = train_char([], 256 + 16)
    examples = [
        (
            fit_prompt(chat_prompt_ids(enc, template, [("user", q)]), context_length, None)[0],
            encode_response(enc, a, template),
        )
        for q, a in answers.items()
    ]
    return save_tiny_model(directory, template, context_length, seed=0, examples=examples, steps=steps)


def train_answers(
    model: GPT, examples: Sequence[tuple[list[int], list[int]]], steps: int, lr: float = 1e-2
) -> None:
    """Fit the answers (loss on the answer tokens only), each example cut to the context's last positions."""
    width = model.cfg.context_length + 1
    rows, targets = [], []
    for prompt, answer in dict.fromkeys((tuple(p), tuple(a)) for p, a in examples):
        prompt, answer = list(prompt), list(answer)
        ids = (prompt + answer)[-width:]
        mask = [False] * (len(ids) - len(answer)) + [True] * len(answer)
        pad = width - len(ids)
        rows.append(ids + [0] * pad)
        targets.append([t if m else -100 for t, m in zip(ids, mask, strict=False)] + [-100] * pad)
    x, y = torch.tensor(rows), torch.tensor(targets)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend on a shared machine
    model.train()
    try:
        for _ in range(steps):
            logits, _ = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


def load_served(specs: dict[str, Path]) -> dict[str, ServedModel]:
    return {f"{name}:latest": load_model_dir(f"{name}:latest", path) for name, path in specs.items()}


@contextmanager
def running_server(
    models: dict[str, ServedModel], concurrency: int = 2, max_queue: int = 256, api_key: str | None = None
) -> Iterator:
    """Our Ollama-API server on 127.0.0.1 (a free port) in a thread; yields (base URL, app)."""
    app = create_app(models, concurrency, max_queue, api_key)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def tiny_model_dirs(root: Path) -> dict[str, Path]:
    """An Alpaca-tuned, a chat-tuned and a base tiny model under ``root``: what the server tests serve."""
    return {
        "sft": save_tiny_model(root / "sft", "alpaca", seed=0),
        "chat": save_tiny_model(root / "chat", "chat", seed=1),
        "base": save_tiny_model(root / "base", None, seed=2),
    }


class SlowTokens:
    """The model's own tokens, 50 ms apart: a generation that is still running when the next request comes."""

    def __init__(self, tokens):
        self.tokens, self.produced = tokens, 0

    def stream(self, prompt_ids, opts):
        for token in self.tokens.stream(prompt_ids, opts):
            time.sleep(0.05)
            self.produced += 1
            yield token


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), for a server a test starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A Llama-family shape at cpu-tiny's size: rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases
LLAMA_SHAPE = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "bias": False}


def save_native_model(
    directory: Path,
    answers: dict[str, str],
    context_length: int = 96,
    steps: int = 150,
    template: str = "chatml",
) -> Path:
    """A tiny Llama-family GPT over a real tokenizer.json (trained by `tokenizers`, SmolLM2's layout) whose
    tokenizer_config.json holds a chat template (tests/helpers/hf_tokenizers.py's ``template``), saved as the
    tokenize (kind hf) and sft stages would (template native), trained to answer each question of ``answers``.
    The base's directory (tokenizer.json + tokenizer_config.json) is ``directory``-base, for transformers."""
    from pipeline.data import chat_template, tokenizer_json
    from pipeline.data.prompts import chat_prompt_ids, encode_response, resolve
    from pipeline.data.tokenizer import read_metadata
    from pipeline.serve.served_model import fit_prompt
    from tests.helpers.hf_tokenizers import CHAT_TEMPLATES, CHATML, trained, write_config
    from tests.helpers.project import generated_corpus

    base = directory.parent / f"{directory.name}-base"
    trained(generated_corpus(60_000), "smollm2", CHATML, base, 600, specials_first=True)
    config = write_config(base, *CHAT_TEMPLATES[template])
    enc, meta = tokenizer_json.read(base / "tokenizer.json")
    meta |= {"source": str(base), "chat_template": chat_template.read_config(config)}
    tokenizer_dir = directory.parent / f"{directory.name}-tokenizer"
    fingerprint = save_tokenizer(enc, tokenizer_dir, "hf", **meta)
    native = resolve("native", read_metadata(tokenizer_dir), enc, "sft.template")
    examples = [
        (
            fit_prompt(chat_prompt_ids(enc, native, [("user", q)]), context_length, None)[0],
            encode_response(enc, a, native, q),
        )
        for q, a in answers.items()
    ]
    torch.manual_seed(0)
    model = GPT(
        config_from_preset("cpu-tiny", vocab_size=enc.n_vocab, context_length=context_length, **LLAMA_SHAPE)
    )
    train_answers(model, examples, steps)
    save_model(
        directory,
        model,
        tokenizer={"path": str(tokenizer_dir), "fingerprint": fingerprint},
        instructions={"template": "native", **native.record()},
    )
    return directory
