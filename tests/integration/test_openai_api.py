"""The OpenAI-compatible /v1 routes and the embedding routes, over real HTTP on 127.0.0.1, spoken to by the
official openai client, langchain-ollama's ChatOllama and the official ollama client."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest
from langchain_ollama import ChatOllama

from pipeline.model.checkpoint import load_model
from pipeline.model.embeddings import embed
from tests.helpers.serving import SlowTokens, load_served, running_server, tiny_model_dirs

QUESTION = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return tiny_model_dirs(root)


@pytest.fixture(scope="module")
def server(model_dirs):
    with running_server(load_served(model_dirs), concurrency=2) as (url, app):
        yield url, app


def client(url: str, key: str = "sk-anything") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_models_listed_and_retrieved(server):
    url, _ = server
    api = client(url)
    assert [m.id for m in api.models.list()] == ["sft:latest", "chat:latest", "base:latest"]
    model = api.models.retrieve("chat:latest")
    assert model.id == "chat:latest" and model.object == "model" and model.created > 0
    with pytest.raises(openai.NotFoundError) as missing:
        api.models.retrieve("gpt-4o")
    assert missing.value.body["code"] == "model_not_found"


def test_chat_whole_and_streamed_agree_with_the_ollama_route(server):
    url, _ = server
    api = client(url)
    whole = api.chat.completions.create(
        model="chat", messages=QUESTION, seed=5, temperature=0.9, max_tokens=12
    )
    choice = whole.choices[0]
    assert (
        whole.object == "chat.completion"
        and whole.id.startswith("chatcmpl-")
        and whole.model == "chat:latest"
    )
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(
        api.chat.completions.create(
            model="chat",
            messages=QUESTION,
            seed=5,
            temperature=0.9,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + [
        choice.finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])

    # Same engine and options as Ollama's /api/chat: the same seed gives the same answer.
    same = ollama.Client(host=url).chat(
        model="chat", messages=QUESTION, options={"seed": 5, "temperature": 0.9, "num_predict": 12}
    )
    assert same.message.content == choice.message.content


def test_sse_framing_ends_with_done(server):
    url, _ = server
    body = {"model": "sft", "messages": QUESTION, "stream": True, "max_tokens": 4, "seed": 1}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_options_max_tokens_stop_and_seed(server):
    url, _ = server
    api = client(url)

    def answer(**kwargs) -> openai.types.chat.ChatCompletion:
        return api.chat.completions.create(model="base", messages=QUESTION, **kwargs)

    greedy = answer(temperature=0, max_tokens=20)
    assert greedy.choices[0].finish_reason == "length" and greedy.usage.completion_tokens == 20
    text = greedy.choices[0].message.content
    stopped = answer(temperature=0, max_tokens=20, stop=[text[3:5]])
    assert stopped.choices[0].message.content == text[: text.index(text[3:5])]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = answer(temperature=1.0, top_p=0.95, seed=11, max_tokens=20).choices[0].message.content
    assert answer(temperature=1.0, top_p=0.95, seed=11, max_tokens=20).choices[0].message.content == sampled
    assert answer(temperature=1.0, top_p=0.95, seed=12, max_tokens=20).choices[0].message.content != sampled
    # max_tokens beyond the context: capped by the room left after the prompt (context 64).
    capped = answer(temperature=0, max_completion_tokens=1000)
    assert capped.usage.prompt_tokens + capped.usage.completion_tokens <= 64
    # Defaults the official clients may send explicitly are accepted.
    assert (
        answer(
            n=1,
            temperature=0,
            max_tokens=20,
            frequency_penalty=0,
            presence_penalty=0,
            logprobs=False,
            response_format={"type": "text"},
            user="me",
        )
        .choices[0]
        .message.content
        == text
    )


def test_completions_whole_and_streamed(server):
    url, _ = server
    api = client(url)
    whole = api.completions.create(model="base", prompt="En un lugar", temperature=0, max_tokens=8)
    assert whole.object == "text_completion" and whole.usage.prompt_tokens == len(b"En un lugar")
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 8
    parts = list(
        api.completions.create(model="base", prompt="En un lugar", temperature=0, max_tokens=8, stream=True)
    )
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    raw = ollama.Client(host=url).generate(
        model="base", prompt="En un lugar", options={"temperature": 0, "num_predict": 8}
    )
    assert raw.response == whole.choices[0].text
    by_ids = api.completions.create(model="base", prompt=list(b"En un lugar"), temperature=0, max_tokens=8)
    assert by_ids.choices[0].text == whole.choices[0].text


def test_embeddings_from_every_client_are_the_pooled_hidden_states(server, model_dirs):
    url, _ = server
    model, _ = load_model(model_dirs["base"])
    expected = embed(model, list(b"red wine"))
    assert math.isclose(sum(v * v for v in expected), 1.0, rel_tol=1e-5) and len(expected) == model.cfg.n_embd

    api = client(url)
    base64_default = api.embeddings.create(
        model="base", input=["red wine", "green tea"]
    )  # the client asks for base64
    floats = api.embeddings.create(model="base", input="red wine", encoding_format="float")
    assert [d.index for d in base64_default.data] == [0, 1] and base64_default.usage.prompt_tokens == 17
    for got in (base64_default.data[0].embedding, floats.data[0].embedding):
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-6

    ours = ollama.Client(host=url).embed(model="base", input=["red wine", "green tea"])
    assert len(ours.embeddings) == 2 and ours.prompt_eval_count == 17
    assert max(abs(a - b) for a, b in zip(ours.embeddings[0], expected, strict=True)) < 1e-6
    legacy = httpx.post(f"{url}/api/embeddings", json={"model": "base", "prompt": "red wine"}).json()[
        "embedding"
    ]
    assert max(abs(a - b) for a, b in zip(legacy, expected, strict=True)) < 1e-6
    # Longer than the context: truncated by default, refused with truncate: false.
    assert len(ollama.Client(host=url).embed(model="base", input="x" * 100).embeddings[0]) == model.cfg.n_embd
    refused = httpx.post(f"{url}/api/embed", json={"model": "base", "input": "x" * 100, "truncate": False})
    assert refused.status_code == 400 and "exceeds the context length" in refused.json()["error"]


def test_langchain_chat_ollama_invoke_and_stream(server):
    url, _ = server
    chat = ChatOllama(model="chat", base_url=url, temperature=0, num_predict=10, seed=3)
    whole = chat.invoke("Name a colour.")
    streamed = "".join(chunk.content for chunk in chat.stream("Name a colour."))
    assert streamed == whole.content
    assert whole.response_metadata["done_reason"] in ("stop", "length")
    assert whole.usage_metadata["output_tokens"] <= 10


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"extra_body": {"made_up_field": 1}}, "made_up_field"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
        ({"messages": []}, "messages"),
    ],
)
def test_unsupported_or_bad_fields_get_a_400_naming_them(server, body, param):
    url, _ = server
    with pytest.raises(openai.BadRequestError) as refused:
        client(url).chat.completions.create(**{"model": "sft", "messages": QUESTION, **body})
    assert refused.value.body["param"] == param, refused.value.body
    assert (
        refused.value.body["type"] == "invalid_request_error"
        and param.split("[")[0] in refused.value.body["message"]
    )


def test_other_bad_requests(server):
    url, _ = server
    bad = httpx.post(f"{url}/v1/chat/completions", content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("invalid JSON")
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="llama3.1:8b", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as several:
        client(url).completions.create(model="base", prompt=["a", "b"])
    assert several.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as dims:
        client(url).embeddings.create(model="base", input="a", dimensions=3)
    assert dims.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as empty:
        client(url).embeddings.create(model="base", input="")
    assert empty.value.body["param"] == "input"


def test_a_model_without_hidden_states_refuses_embeddings_with_a_400(model_dirs):
    """The ONNX graph outputs logits only (OnnxGenerator has no ``embed``): such a model answers 400, both APIs."""
    from pipeline.export.onnx_generate import OnnxGenerator

    assert not hasattr(OnnxGenerator, "embed")
    models = load_served({"logits-only": model_dirs["base"]})
    models["logits-only:latest"].tokens = SlowTokens(models["logits-only:latest"].tokens)  # stream() only
    with running_server(models) as (url, _):
        refused = httpx.post(f"{url}/api/embed", json={"model": "logits-only", "input": "hi"})
        assert refused.status_code == 400 and "does not support embeddings" in refused.json()["error"]
        with pytest.raises(openai.BadRequestError) as openai_refused:
            client(url).embeddings.create(model="logits-only", input="hi")
        assert openai_refused.value.body["param"] == "model"


def test_api_key_when_configured(model_dirs):
    with running_server(load_served({"sft": model_dirs["sft"]}), api_key="s3cret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert [m.id for m in client(url, "s3cret").models.list()] == ["sft:latest"]
        assert httpx.get(f"{url}/api/tags").status_code == 401
        keyed = ollama.Client(host=url, headers={"Authorization": "Bearer s3cret"})
        assert [m.model for m in keyed.list().models] == ["sft:latest"]
        assert httpx.get(url).text == "Ollama is running"


def test_fifty_concurrent_streaming_chats_across_both_apis(server):
    url, app = server
    before = app.state.requests["/api/chat"] + app.state.requests["/v1/chat/completions"]

    def one(i: int) -> str:
        messages = [{"role": "user", "content": f"Question {i}?"}]
        if i % 2:
            chunks = client(url).chat.completions.create(
                model="sft", messages=messages, seed=i, max_tokens=16, stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        parts = list(
            ollama.Client(host=url, timeout=120).chat(
                model="sft", messages=messages, stream=True, options={"seed": i, "num_predict": 16}
            )
        )
        assert parts[-1].done
        return "".join(p.message.content for p in parts)

    with ThreadPoolExecutor(max_workers=50) as pool:
        futures = [pool.submit(one, i) for i in range(50)]
        errors = [f.exception() for f in futures if f.exception() is not None]
    assert errors == []
    after = app.state.requests["/api/chat"] + app.state.requests["/v1/chat/completions"]
    assert after - before == 50


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_stops_its_v1_generation(model_dirs, stream):
    models = load_served({"base": model_dirs["base"]})
    slow = models["base:latest"].tokens = SlowTokens(models["base:latest"].tokens)
    body = {
        "model": "base",
        "prompt": "abc",
        "max_tokens": 40,
        "temperature": 0,
        "stop": ["\x00"],
        "stream": stream,
    }
    with running_server(models, concurrency=1) as (url, app):
        if stream:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                assert next(response.iter_lines()).startswith("data: ")
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 30
        while app.state.engine.slots.locked() or slow.produced == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert slow.produced < 40
