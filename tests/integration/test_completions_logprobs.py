"""``logprobs`` and ``echo`` on ``/v1/completions`` and the tokenizer routes, over real HTTP on 127.0.0.1 with
the official openai client; then EleutherAI's lm-evaluation-harness scoring a real ``python -m pipeline serve``
(its ``local-completions`` model) and our in-process adapter on the same local task."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from pipeline.evaluation.benchmark_tasks import CLOZE, PREFERENCE, cloze_docs, preference_docs, write_task
from pipeline.model.checkpoint import load_model
from tests.helpers.project import ROOT
from tests.helpers.serving import SlowTokens, free_port, load_served, running_server, save_tiny_model

TOLERANCE = 1e-4  # float32 log-softmax of the same weights, one forward pass each: equal up to rounding


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "base", template=None, seed=2)


@pytest.fixture(scope="module")
def server(base_dir):
    with running_server(load_served({"base": base_dir})) as (url, _):
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-anything", max_retries=0, timeout=60)


def own_logprobs(model_dir, ids: list[int]) -> torch.Tensor:
    """(len(ids)-1, vocab): the model's log-softmax over each next token, computed here, apart from the server."""
    model, _ = load_model(model_dir)
    with torch.no_grad():
        logits, _ = model.eval()(torch.tensor([ids[:-1]]))
    return torch.log_softmax(logits[0].float(), dim=-1)


def test_echo_scores_the_prompt_as_the_model_does(server, base_dir):
    prompt = "En un lugar de la Mancha"
    ids = list(prompt.encode())  # the tiny models' tokenizer is byte-level
    answer = client(server).completions.create(
        model="base", prompt=prompt, echo=True, max_tokens=0, logprobs=5
    )
    choice = answer.choices[0]
    got = choice.logprobs
    assert (
        choice.text == prompt and got.tokens == list(prompt) and got.text_offset == list(range(len(prompt)))
    )
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    expected = own_logprobs(base_dir, ids)
    for i, token in enumerate(ids[1:]):
        assert abs(got.token_logprobs[i + 1] - expected[i, token].item()) < TOLERANCE
        values, indices = expected[i].topk(5)
        top = got.top_logprobs[i + 1]
        assert len(top) <= 5 and max(top.values()) == pytest.approx(values[0].item(), abs=TOLERANCE)
        printable = [(t, v) for t, v in zip(indices.tolist(), values.tolist(), strict=True) if t < 128]
        for token_id, value in printable:  # ASCII tokens are listed by their character
            assert top[chr(token_id)] == pytest.approx(value, abs=TOLERANCE)
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 0


def test_generated_tokens_carry_their_logprobs_and_top_k(server, base_dir):
    answer = client(server).completions.create(
        model="base", prompt="Hola", temperature=0, max_tokens=6, logprobs=3
    )
    choice = answer.choices[0]
    got = choice.logprobs
    assert "".join(got.tokens) == choice.text and len(got.tokens) == 6 and choice.finish_reason == "length"
    assert got.text_offset == [len("".join(got.tokens[:i])) for i in range(6)]
    expected = own_logprobs(base_dir, list(b"Hola") + [ord(c) for c in choice.text])
    for i, token in enumerate(got.tokens):
        row = expected[3 + i]
        assert abs(got.token_logprobs[i] - row[ord(token)].item()) < TOLERANCE
        assert len(got.top_logprobs[i]) == 3
        # temperature 0 takes the argmax: each token is the likeliest of its top-k
        assert got.token_logprobs[i] == max(got.top_logprobs[i].values())
    zero = client(server).completions.create(
        model="base", prompt="Hola", temperature=0, max_tokens=2, logprobs=0
    )
    assert zero.choices[0].logprobs.top_logprobs == [{}, {}]
    plain = client(server).completions.create(model="base", prompt="Hola", temperature=0, max_tokens=6)
    assert plain.choices[0].text == choice.text and plain.choices[0].logprobs is None


def test_echo_with_token_ids_and_a_generated_token(server, base_dir):
    ids = list(b"abc def")
    answer = client(server).completions.create(
        model="base", prompt=ids, echo=True, max_tokens=1, logprobs=1, temperature=0
    )
    got = answer.choices[0].logprobs
    assert len(got.tokens) == len(ids) + 1 and answer.choices[0].text.startswith("abc def")
    assert "".join(got.tokens) == answer.choices[0].text
    expected = own_logprobs(base_dir, ids + [ord(got.tokens[-1])])
    assert all(
        abs(got.token_logprobs[i + 1] - expected[i, t].item()) < TOLERANCE
        for i, t in enumerate(ids[1:] + [ord(got.tokens[-1])])
    )
    # A one-token prompt echoed alone: its only log-probability is null.
    single = client(server).completions.create(model="base", prompt=[65], echo=True, max_tokens=0)
    assert single.choices[0].logprobs.token_logprobs == [None] and single.choices[0].text == "A"
    # With max_tokens 0 the whole context may be scored; one more token is a 400 (test below).
    full = client(server).completions.create(model="base", prompt="y" * 64, echo=True, max_tokens=0)
    assert len(full.choices[0].logprobs.tokens) == 64


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": "3"}, "logprobs"),
        ({"logprobs": 1.5}, "logprobs"),
        ({"echo": "yes"}, "echo"),
        ({"echo": 1}, "echo"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"logprobs": 2, "stream": True}, "stream"),
        ({"echo": True, "max_tokens": 0, "prompt": "x" * 65}, "prompt"),  # the context is 64 tokens
        ({"echo": True, "max_tokens": 10, "prompt": "x" * 60}, "prompt"),
        ({"prompt": [1, 2, 99999], "echo": True, "max_tokens": 0}, "prompt"),
    ],
)
def test_bad_logprobs_and_echo_get_a_400_naming_them(server, body, param):
    response = httpx.post(
        f"{server}/v1/completions", json={"model": "base", "prompt": "Hola", **body}, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    with pytest.raises(openai.BadRequestError):  # the official client sees the same refusal
        client(server).completions.create(**{"model": "base", "prompt": "Hola", **body})


class EndsAtOnce:
    """The model's scoring, but a generation that ends at once with end-of-text (as a trained model may)."""

    def __init__(self, tokens, eot: int):
        self.score, self.eot = tokens.score, eot

    def stream(self, prompt_ids, opts):
        yield self.eot


def test_the_token_that_ended_the_answer_is_listed_and_scored(base_dir):
    """The harness drops the last echoed token as the generated one: an answer that ends at once must still have it."""
    models = load_served({"base": base_dir})
    eot = models["base:latest"].encoding.eot_token
    models["base:latest"].tokens = EndsAtOnce(models["base:latest"].tokens, eot)
    with running_server(models) as (url, _):
        answer = client(url).completions.create(
            model="base", prompt="Hola", echo=True, max_tokens=1, logprobs=1
        )
    choice = answer.choices[0]
    assert choice.text == "Hola" and choice.finish_reason == "stop" and answer.usage.completion_tokens == 0
    assert choice.logprobs.tokens == ["H", "o", "l", "a", "<|endoftext|>"]
    expected = own_logprobs(base_dir, [*b"Hola", eot])
    assert abs(choice.logprobs.token_logprobs[-1] - expected[3, eot].item()) < TOLERANCE


def test_a_model_without_scoring_refuses_logprobs_with_a_400(base_dir):
    """Like the ONNX export (OnnxGenerator has no ``score``): a generator that only streams tokens."""
    from pipeline.export.onnx_generate import OnnxGenerator

    assert not hasattr(OnnxGenerator, "score")
    models = load_served({"stream-only": base_dir})
    models["stream-only:latest"].tokens = SlowTokens(models["stream-only:latest"].tokens)  # stream() only
    with running_server(models) as (url, _):
        for body, param in (({"logprobs": 1}, "logprobs"), ({"echo": True, "max_tokens": 0}, "echo")):
            with pytest.raises(openai.BadRequestError) as refused:
                client(url).completions.create(model="stream-only", prompt="Hola", **body)
            assert (
                refused.value.body["param"] == param and "log-probabilities" in refused.value.body["message"]
            )
        plain = client(url).completions.create(
            model="stream-only", prompt="Hola", max_tokens=2, temperature=0
        )
        assert plain.usage.completion_tokens == 2  # generation itself still works


def test_chat_still_refuses_logprobs(server):
    with pytest.raises(openai.BadRequestError) as refused:
        client(server).chat.completions.create(
            model="base", messages=[{"role": "user", "content": "hi"}], logprobs=True
        )
    assert refused.value.body["param"] == "logprobs"


def test_tokenizer_routes_round_trip(server):
    info = httpx.get(f"{server}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64
    tokens = httpx.post(f"{server}/tokenize", json={"prompt": "año<|endoftext|>"}).json()["tokens"]
    assert tokens == list("año".encode()) + [256]
    assert httpx.post(f"{server}/detokenize", json={"tokens": tokens}).json()["prompt"] == "año<|endoftext|>"
    bad = httpx.post(f"{server}/detokenize", json={"tokens": [1, "a"]})
    assert bad.status_code == 400 and "tokens" in bad.json()["error"]


HARNESS_TOLERANCE = (
    1e-4  # per-item log-likelihoods: the same float32 forward pass, once in process, once served
)


@pytest.fixture
def harness_tasks(tmp_path, monkeypatch):
    """Both pipeline tasks over a few Spanish items, as the benchmark stage writes them, and the harness offline."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    text = (
        "En un lugar de la Mancha de cuyo nombre no quiero acordarme no ha mucho tiempo que vivía un hidalgo.\n\n"
        "Tenía en su casa una ama que pasaba de los cuarenta y una sobrina que no llegaba a los veinte años.\n\n"
        "Frisaba la edad de nuestro hidalgo con los cincuenta años y era de complexión recia y seco de carnes."
    )
    pairs = [
        ("¿De qué color es el cielo?", "Azul.", "No lo sé, quizá verde."),
        ("Dime un número par.", "Cuatro.", "Siete."),
        ("¿Cómo se dice hello?", "Hola.", "Adiós, amigo mío."),
    ]
    # Passages short enough for the tiny context: the served path scores at most 63 tokens (one is generated).
    write_task(tmp_path / "tasks", CLOZE, cloze_docs([text], limit=10, max_chars=50))
    write_task(tmp_path / "tasks", PREFERENCE, preference_docs(pairs, limit=10))
    return tmp_path / "tasks"


def per_item(result: dict, task: str) -> list[float]:
    """Every scored (context, continuation) log-likelihood of ``task``, in document order."""
    return [
        resp[0][0]
        for sample in sorted(result["samples"][task], key=lambda s: s["doc_id"])
        for resp in sample["resps"]
    ]


def test_the_harness_scores_the_server_as_it_scores_the_model_in_process(base_dir, harness_tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pipeline.evaluation.harness import PipelineLM

    tasks = [CLOZE, PREFERENCE]
    manager = TaskManager(include_path=str(harness_tasks), include_defaults=False)
    local = lm_eval.simple_evaluate(
        model=PipelineLM(base_dir), tasks=tasks, task_manager=manager, log_samples=True
    )
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
            f"base={base_dir}",
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
        # remote: the harness tokenizes through our /tokenize and sends token ids (tokenized_requests).
        served = lm_eval.simple_evaluate(
            model="local-completions",
            tasks=tasks,
            task_manager=manager,
            log_samples=True,
            model_args=f"base_url=http://127.0.0.1:{port}/v1/completions,model=base,tokenizer_backend=remote,"
            "tokenized_requests=True,max_length=64,num_concurrent=1,max_retries=1",
        )
    finally:
        process.terminate()
        process.communicate(timeout=30)
    for task in tasks:
        ours, theirs = per_item(local, task), per_item(served, task)
        assert len(ours) == len(theirs) >= 2 and all(math.isfinite(v) for v in ours)
        assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < HARNESS_TOLERANCE
    for metric in ("acc,none", "perplexity,none"):
        assert served["results"][CLOZE][metric] == pytest.approx(local["results"][CLOZE][metric], rel=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert served["results"][PREFERENCE][metric] == local["results"][PREFERENCE][metric]
    print(
        f"harness scores, in process vs served: {CLOZE} acc {local['results'][CLOZE]['acc,none']} vs "
        f"{served['results'][CLOZE]['acc,none']}, perplexity {local['results'][CLOZE]['perplexity,none']:.6g} vs "
        f"{served['results'][CLOZE]['perplexity,none']:.6g}; {PREFERENCE} acc "
        f"{local['results'][PREFERENCE]['acc,none']} vs {served['results'][PREFERENCE]['acc,none']}"
    )
