"""Our Ollama-API server over real HTTP on 127.0.0.1, spoken to by the official ollama client (and raw httpx)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ollama
import pytest

from pipeline.cli import main
from pipeline.data.prompts import chat_prompt_ids
from pipeline.data.tokenizer import train_char
from pipeline.serve.served_model import StopScanner, fit_prompt
from tests.helpers.serving import (
    SlowTokens,
    free_port,
    load_served,
    running_server,
    save_tiny_model,
    tiny_model_dirs,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return tiny_model_dirs(root)


@pytest.fixture(scope="module")
def server(model_dirs):
    with running_server(load_served(model_dirs), concurrency=2) as (url, app):
        yield url, app, ollama.Client(host=url, timeout=60)


def ask(client: ollama.Client, model: str = "sft", **options) -> ollama.ChatResponse:
    return client.chat(model=model, messages=[{"role": "user", "content": "Name a colour."}], options=options)


# ---------------------------------------------------------------------------------------------- pure parts


def test_stop_scanner_holds_back_a_possible_stop_across_pieces():
    scanner = StopScanner(["###", "\n\n"])
    assert scanner.feed("abc#") == ("abc", False)  # "#" may start "###"
    assert scanner.feed("#x") == ("##x", False)
    assert scanner.feed("yz##") == ("yz", False)
    assert scanner.feed("#tail") == ("", True)
    assert StopScanner([]).feed("anything") == ("anything", False)


def test_fit_prompt_keeps_the_tail_and_room_to_answer():
    ids = list(range(100))
    assert fit_prompt(ids, 64, 8) == (ids[-56:], 8)
    assert fit_prompt(ids[:10], 64, None) == (ids[:10], 54)  # no num_predict: until the context is full
    kept, room = fit_prompt(ids, 64, -1)
    assert kept == ids[-48:] and room == 16  # at least a quarter of the context to answer in


def test_chat_rendering_per_template():
    enc = train_char([], 272)
    turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Colour?")]
    alpaca = enc.decode(chat_prompt_ids(enc, "alpaca", turns))
    assert "### Instruction:\nColour?\n\n### Input:\nsystem: Be brief.\nuser: Hi\nassistant: Hello" in alpaca
    assert alpaca.endswith("### Response:\n")
    chat = enc.decode(chat_prompt_ids(enc, "chat", turns))
    assert (
        chat
        == "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello<|end|><|user|>Colour?<|end|><|assistant|>"
    )
    assert enc.decode(chat_prompt_ids(enc, None, turns)) == "Be brief.\n\nHi\n\nHello\n\nColour?"


# ---------------------------------------------------------------------------------------------- the API


def test_tags_show_ps_version_and_root(server):
    url, _, client = server
    names = [m.model for m in client.list().models]
    assert names == ["sft:latest", "chat:latest", "base:latest"]
    listed = client.list().models[0]
    assert listed.details.format == "safetensors" and listed.details.family == "gpt" and listed.size > 0
    shown = client.show("sft")
    assert shown.modelinfo["gpt.context_length"] == 64 and shown.modelinfo["template"] == "alpaca"
    assert shown.capabilities == ["completion"] and client.show("base:latest").template.startswith(
        "(raw text"
    )
    assert [m.model for m in client.ps().models] == names
    assert httpx.get(f"{url}/api/version").json()["version"]
    assert httpx.get(url).text == "Ollama is running"


def test_chat_streamed_and_whole_agree_and_report_counts(server):
    _, _, client = server
    whole = ask(client, seed=7, num_predict=12)
    parts = list(
        client.chat(
            model="sft",
            messages=[{"role": "user", "content": "Name a colour."}],
            options={"seed": 7, "num_predict": 12},
            stream=True,
        )
    )
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    final = parts[-1]
    assert (
        final.eval_count == whole.eval_count <= 12 and final.prompt_eval_count == whole.prompt_eval_count > 0
    )
    assert final.done_reason in ("stop", "length") and final.message.role == "assistant"


def test_generate_streamed_whole_and_context(server):
    _, _, client = server
    whole = client.generate(model="base", prompt="En un lugar", options={"temperature": 0, "num_predict": 6})
    parts = list(
        client.generate(
            model="base", prompt="En un lugar", options={"temperature": 0, "num_predict": 6}, stream=True
        )
    )
    assert "".join(p.response for p in parts) == whole.response
    assert whole.context[: len("En un lugar")] == list(b"En un lugar")  # a raw model: the prompt's bytes
    assert len(whole.context) == len("En un lugar") + whole.eval_count
    assert client.generate(model="sft", prompt="").done_reason == "load"


def test_options_are_honoured(server):
    _, _, client = server
    greedy = ask(client, model="base", temperature=0, num_predict=20)
    assert ask(client, model="base", temperature=0, num_predict=20).message.content == greedy.message.content
    # top_k=1 keeps only the most likely token: sampling at any temperature is then greedy.
    assert (
        ask(client, model="base", temperature=1.5, top_k=1, seed=3, num_predict=20).message.content
        == greedy.message.content
    )
    sampled = ask(client, model="base", temperature=1.0, top_p=0.95, seed=11, num_predict=20).message.content
    assert (
        ask(client, model="base", temperature=1.0, top_p=0.95, seed=11, num_predict=20).message.content
        == sampled
    )
    assert (
        ask(client, model="base", temperature=1.0, top_p=0.95, seed=12, num_predict=20).message.content
        != sampled
    )
    assert ask(client, model="base", temperature=0, num_predict=3).eval_count <= 3
    # llama.cpp's repeat penalty changes the greedy answer; with no window (0) it is off.
    penalised = ask(client, model="base", temperature=0, num_predict=20, repeat_penalty=4.0, repeat_last_n=-1)
    assert penalised.message.content != greedy.message.content
    assert (
        ask(
            client, model="base", temperature=0, num_predict=20, repeat_penalty=4.0, repeat_last_n=-1
        ).message.content
        == penalised.message.content
    )
    assert (
        ask(
            client, model="base", temperature=0, num_predict=20, repeat_penalty=4.0, repeat_last_n=0
        ).message.content
        == greedy.message.content
    )
    # A stop string cuts the answer before it, whichever token boundary it straddles.
    text = greedy.message.content
    stop = text[3:5]
    stopped = ask(client, model="base", temperature=0, num_predict=20, stop=[stop])
    assert stopped.message.content == text[: text.index(stop)] and stopped.done_reason == "stop"
    # num_ctx below the model's context: the prompt's start is dropped to fit.
    long = client.chat(
        model="base",
        messages=[{"role": "user", "content": "x" * 200}],
        options={"temperature": 0, "num_ctx": 32, "num_predict": 4},
    )
    assert long.prompt_eval_count + 4 <= 32


def test_bad_requests_get_4xx_with_a_message(server):
    url, _, client = server
    with pytest.raises(ollama.ResponseError) as missing:
        ask(client, model="llama3.1:8b")
    assert missing.value.status_code == 404 and "try pulling it first" in missing.value.error
    for body in (b"{not json", b'{"model": "sft", "messages": [}'):
        bad = httpx.post(f"{url}/api/chat", content=body)
        assert bad.status_code == 400 and bad.json()["error"].startswith("invalid JSON in the request body")
    cases = [
        ("/api/chat", [1, 2], "the body must be a JSON object"),
        ("/api/chat", {"messages": []}, "model: Field required"),
        ("/api/chat", {"model": "sft", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (
            "/api/chat",
            {"model": "sft", "messages": [{"role": "user", "content": "x"}], "options": {"temperature": -1}},
            "options.temperature",
        ),
        ("/api/chat", {"model": "sft", "messages": [{"role": "assistant", "content": "x"}]}, "the user's"),
        (
            "/api/chat",
            {"model": "sft", "messages": [{"role": "user", "content": "x"}], "format": "json"},
            "format",
        ),
        (
            "/api/chat",
            {"model": "sft", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "x"}]},
            "tools",
        ),
        ("/api/generate", {"model": "sft", "prompt": "x", "options": {"top_p": 2}}, "options.top_p"),
        ("/api/generate", {"model": "base", "prompt": "x", "context": [999999]}, "context"),
        ("/api/show", {}, "model"),
    ]
    for path, body, fragment in cases:
        response = httpx.post(f"{url}{path}", json=body)
        assert response.status_code == 400, (path, body, response.text)
        assert fragment in response.json()["error"], response.json()


def test_fifty_concurrent_chats_all_answered(server):
    url, app, _ = server
    before = app.state.requests["/api/chat"]

    def one(i: int) -> str:
        client = ollama.Client(host=url, timeout=120)
        messages = [{"role": "user", "content": f"Question {i}?"}]
        options = {"seed": i, "num_predict": 16}
        if i % 2:  # half of them streamed, read to the end
            parts = list(client.chat(model="sft", messages=messages, options=options, stream=True))
            assert parts[-1].done
            return "".join(p.message.content for p in parts)
        return client.chat(model="sft", messages=messages, options=options).message.content

    with ThreadPoolExecutor(max_workers=50) as pool:
        futures = [pool.submit(one, i) for i in range(50)]
        errors = [f.exception() for f in futures if f.exception() is not None]
    assert errors == [] and len(futures) == 50
    assert app.state.requests["/api/chat"] - before == 50
    # The same seed gives the same answer, streamed or not, whether it waited in the queue or not.
    assert [futures[i].result() for i in (0, 1, 48, 49)] == [one(i) for i in (0, 1, 48, 49)]


def test_a_full_queue_answers_503_and_the_running_request_completes(model_dirs):
    models = load_served({"sft": model_dirs["sft"]})
    models["sft:latest"].tokens = SlowTokens(models["sft:latest"].tokens)
    body = {
        "model": "sft",
        "messages": [{"role": "user", "content": "x"}],
        "stream": False,
        "options": {"num_predict": 30, "temperature": 0},
    }
    with running_server(models, concurrency=1, max_queue=0) as (url, app):
        with ThreadPoolExecutor(max_workers=1) as pool:
            running = pool.submit(httpx.post, f"{url}/api/chat", json=body, timeout=60)
            deadline = time.monotonic() + 30
            while not app.state.engine.slots.locked():
                assert time.monotonic() < deadline and not running.done()
                time.sleep(0.01)
            refused = httpx.post(f"{url}/api/chat", json=body)
            assert refused.status_code == 503 and "server busy" in refused.json()["error"]
            assert running.result().status_code == 200 and running.result().json()["done"]


def test_a_client_that_goes_away_stops_its_generation(model_dirs):
    models = load_served({"base": model_dirs["base"]})
    slow = models["base:latest"].tokens = SlowTokens(models["base:latest"].tokens)
    body = {
        "model": "base",
        "prompt": "abc",
        "options": {"num_predict": 40, "temperature": 0, "stop": ["\x00"]},
    }
    with running_server(models, concurrency=1) as (url, app):
        read_to_the_end = httpx.post(f"{url}/api/generate", json=body | {"stream": False}, timeout=60).json()
        assert read_to_the_end["eval_count"] == slow.produced == 40
        slow.produced = 0
        with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert not json.loads(next(lines))["done"]
        deadline = time.monotonic() + 30
        while app.state.engine.slots.locked():  # the slot is given back once the generation has stopped
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert slow.produced < 40


# ---------------------------------------------------------------------------------------------- the command


def test_cli_serves_a_model_dir_on_loopback(model_dirs, capsys):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "serve",
            "--port",
            str(port),
            "--models",
            f"tiny={model_dirs['chat']}",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/version").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        client = ollama.Client(host=f"127.0.0.1:{port}")
        assert [m.model for m in client.list().models] == ["tiny:latest"]
        assert client.chat(
            model="tiny", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 4}
        ).done
        # A second server on the same port: one clear line, exit 1.
        assert main(["serve", "--port", str(port), "--models", f"tiny={model_dirs['chat']}"]) == 1
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert f"at http://127.0.0.1:{port}" in err


def test_cli_refuses_a_missing_model_dir(tmp_path, capsys):
    assert main(["serve", "--port", str(free_port()), "--models", f"x={tmp_path / 'nowhere'}"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nowhere'}: model directory not found"


def test_onnx_export_is_served(tmp_path, model_dirs):
    from pipeline.common.atomic import write_json
    from pipeline.common.hashing import sha256_file
    from pipeline.export.onnx import export_graph
    from pipeline.export.onnx_generate import TOKENIZER_DIR, VARIANT_FILES
    from pipeline.model.checkpoint import load_model

    model, meta = load_model(model_dirs["sft"])
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    export_graph(model, onnx_dir / VARIANT_FILES["fp32"], 18)
    tokenizer = Path(meta["tokenizer"]["path"])
    (onnx_dir / TOKENIZER_DIR).mkdir()
    for file in tokenizer.iterdir():
        (onnx_dir / TOKENIZER_DIR / file.name).write_bytes(file.read_bytes())
    write_json(
        onnx_dir / "config.json",
        {
            "model": model.cfg.to_dict(),
            "source": {"directory": str(model_dirs["sft"])},
            "onnx": {"files": {"fp32": VARIANT_FILES["fp32"]}, "opset": 18},
            "sha256": {VARIANT_FILES["fp32"]: sha256_file(onnx_dir / VARIANT_FILES["fp32"])},
        },
    )
    models = load_served({"onnx": onnx_dir, "sft": model_dirs["sft"]})
    with running_server(models) as (url, _):
        client = ollama.Client(host=url)
        assert (
            client.show("onnx").details.format == "onnx"
            and client.show("onnx").modelinfo["template"] == "alpaca"
        )
        # Greedy decoding: onnxruntime and torch pick the same tokens.
        assert (
            ask(client, "onnx", temperature=0, num_predict=12).message.content
            == ask(client, "sft", temperature=0, num_predict=12).message.content
        )


# The Llama family's shapes (grouped-query attention, no biases; Qwen3's q/k norms and wide heads).
FAMILIES = {
    "llama": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "bias": False},
    "qwen3": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "n_kv_head": 2}
    | {"head_size": 32, "bias": False, "norm_eps": 1e-6},
}


def test_llama_family_models_are_served_in_their_chat_template(tmp_path):
    """Each family's chat model answers /api/chat through its template (the prompt ids our chat template gives),
    deterministically at temperature 0."""
    dirs = {
        name: save_tiny_model(tmp_path / name, "chat", seed=3, **shape) for name, shape in FAMILIES.items()
    }
    served = load_served(dirs)
    with running_server(served) as (url, _):
        client = ollama.Client(host=url, timeout=60)
        for name in FAMILIES:
            model = served[f"{name}:latest"]
            prompt = chat_prompt_ids(model.encoding, "chat", [("user", "Name a colour.")])
            assert model.chat_ids([("user", "Name a colour.")]) == prompt
            replies = [ask(client, f"{name}:latest", seed=7, num_predict=12, temperature=0) for _ in range(2)]
            assert (
                replies[0].prompt_eval_count == len(prompt) and replies[0].eval_count > 0 and replies[0].done
            )
            assert replies[0].message.content == replies[1].message.content
