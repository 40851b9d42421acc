"""The server never answers 5xx to a client's mistake: each bad option is a 400 naming the field, a client that
leaves a non-streamed request cancels it, and a seeded fuzz of every route the app lists finds no 5xx."""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from tests.helpers.serving import load_served, running_server, save_tiny_model

CHAT = {
    "model": "sft",
    "messages": [{"role": "user", "content": "Name a colour."}],
    "stream": False,
    "options": {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "seed": 1, "num_predict": 6, "num_ctx": 64},
}
GENERATE = {
    "model": "base",
    "prompt": "En un lugar",
    "stream": False,
    "options": {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "seed": 1, "num_predict": 6, "num_ctx": 64},
}
# A valid request per POST route; a route the app lists without one here fails test_every_route_has_a_valid_request.
OPENAI = {"temperature": 0.7, "top_p": 0.9, "seed": 1, "max_tokens": 6, "stream": False}
VALID = {
    "/api/chat": CHAT,
    "/api/generate": GENERATE,
    "/api/show": {"model": "sft"},
    "/v1/chat/completions": {
        "model": "sft",
        "messages": [{"role": "user", "content": "Name a colour."}],
        **OPENAI,
    },
    "/v1/completions": {"model": "base", "prompt": "En un lugar", "logprobs": 1, **OPENAI},
    "/v1/embeddings": {"model": "base", "input": ["En un lugar", "de la Mancha"]},
    "/api/embed": {"model": "base", "input": ["En un lugar"]},
    "/api/embeddings": {"model": "base", "prompt": "En un lugar"},
    "/tokenize": {"model": "base", "prompt": "En un lugar"},
    "/detokenize": {"model": "base", "tokens": [69, 110]},
}
# POST routes whose valid request does not generate (left out of the share that reaches generation)
NOT_GENERATING = {"/api/show", "/v1/embeddings", "/api/embed", "/api/embeddings", "/tokenize", "/detokenize"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    models = load_served(
        {
            "sft": save_tiny_model(root / "sft", "alpaca", seed=0),
            "base": save_tiny_model(root / "base", None, seed=2),
        }
    )
    counter = GenerationCounter()
    for model in models.values():
        model.tokens = counter.wrap(model.tokens)
    with running_server(models, concurrency=2) as (url, app):
        yield url, app, counter


class GenerationCounter:
    """Counts generations that produced at least one token (the fuzz states how many requests got that far)."""

    def __init__(self):
        self.generations, self.lock = 0, threading.Lock()

    def wrap(self, tokens):
        counter = self

        class Counted:
            def stream(self, prompt_ids, opts):
                first = True
                for token in tokens.stream(prompt_ids, opts):
                    if first:
                        with counter.lock:
                            counter.generations += 1
                        first = False
                    yield token

            def embed(self, ids):  # the embedding routes work as on the real model
                return tokens.embed(ids)

        return Counted()


def with_options(body: dict, **options) -> dict:
    out = copy.deepcopy(body)
    out["options"].update(options)
    return out


REFUSED = [
    ("num_ctx_too_small", "/api/chat", with_options(CHAT, num_ctx=1), "options.num_ctx"),
    ("num_ctx_zero", "/api/generate", with_options(GENERATE, num_ctx=0), "options.num_ctx"),
    (
        "empty_user_message_base",
        "/api/chat",
        {**CHAT, "model": "base", "messages": [{"role": "user", "content": ""}]},
        "messages",
    ),
    (
        "empty_user_message_streamed",
        "/api/chat",
        {**CHAT, "model": "base", "stream": True, "messages": [{"role": "user", "content": ""}]},
        "messages",
    ),
    ("seed_2_pow_64", "/api/chat", with_options(CHAT, seed=2**64), "options.seed"),
    ("seed_negative", "/api/generate", with_options(GENERATE, seed=-1), "options.seed"),
    ("temperature_negative", "/api/chat", with_options(CHAT, temperature=-0.5), "options.temperature"),
    ("top_k_zero", "/api/chat", with_options(CHAT, top_k=0), "options.top_k"),
    ("top_k_negative", "/api/generate", with_options(GENERATE, top_k=-5), "options.top_k"),
    ("top_p_zero", "/api/chat", with_options(CHAT, top_p=0), "options.top_p"),
    ("top_p_above_one", "/api/generate", with_options(GENERATE, top_p=1.5), "options.top_p"),
    ("options_not_a_mapping", "/api/chat", {**CHAT, "options": [1]}, "options"),
    ("num_predict_zero", "/api/generate", with_options(GENERATE, num_predict=0), "options.num_predict"),
    ("num_predict_minus_3", "/api/chat", with_options(CHAT, num_predict=-3), "options.num_predict"),
    ("num_predict_a_string", "/api/chat", with_options(CHAT, num_predict="6"), "options.num_predict"),
    ("repeat_penalty_negative", "/api/chat", with_options(CHAT, repeat_penalty=-1), "options.repeat_penalty"),
    (
        "repeat_penalty_zero",
        "/api/generate",
        with_options(GENERATE, repeat_penalty=0),
        "options.repeat_penalty",
    ),
    ("min_p_above_one", "/api/generate", with_options(GENERATE, min_p=2), "options.min_p"),
    ("mirostat_3", "/api/chat", with_options(CHAT, mirostat=3), "options.mirostat"),
    ("use_mmap_a_string", "/api/chat", with_options(CHAT, use_mmap="yes"), "options.use_mmap"),
    (
        "temperature_a_string",
        "/api/generate",
        with_options(GENERATE, temperature="0.5"),
        "options.temperature",
    ),
    ("stream_yes", "/api/chat", {**CHAT, "stream": "yes"}, "stream"),
    ("stream_one", "/api/generate", {**GENERATE, "stream": 1}, "stream"),
    ("raw_yes", "/api/generate", {**GENERATE, "raw": "yes"}, "raw"),
    ("embed_truncate_yes", "/api/embed", {"model": "base", "input": "a", "truncate": "yes"}, "truncate"),
    ("embed_an_empty_text_in_a_list", "/api/embed", {"model": "base", "input": ["a", ""]}, "input[1]"),
    (
        "embed_options_out_of_range",
        "/api/embed",
        {"model": "base", "input": "a", "options": {"repeat_penalty": -1}},
        "options.repeat_penalty",
    ),
    ("embed_too_many_inputs", "/api/embed", {"model": "base", "input": ["a"] * 2049}, "at most 2048 inputs"),
]


@pytest.mark.parametrize("path, body, field", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_bad_option_is_a_400_naming_it(served, path, body, field):
    url, _, _ = served
    response = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]


CLAMPED = [
    ("num_predict_beyond_the_context", with_options(GENERATE, num_predict=10**9, temperature=0)),
    ("num_ctx_beyond_the_model", with_options(GENERATE, num_ctx=10**9, num_predict=4)),
    ("num_predict_negative_means_until_full", with_options(GENERATE, num_predict=-1, num_ctx=16)),
]


OPENAI_REFUSED = [
    ("user_a_number", "/v1/chat/completions", {"user": 5}, "user"),
    ("store_a_string", "/v1/completions", {"store": "yes"}, "store"),
    ("stream_yes", "/v1/chat/completions", {"stream": "yes"}, "stream"),
    ("stream_one", "/v1/completions", {"stream": 1}, "stream"),
    (
        "include_usage_yes",
        "/v1/completions",
        {"stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
    ),
    ("temperature_a_string", "/v1/chat/completions", {"temperature": "0.7"}, "temperature"),
    ("max_tokens_zero", "/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens_beyond_int32", "/v1/chat/completions", {"max_tokens": 2**31}, "max_tokens"),
    (
        "max_completion_tokens_true",
        "/v1/chat/completions",
        {"max_completion_tokens": True},
        "max_completion_tokens",
    ),
    ("embeddings_user_a_number", "/v1/embeddings", {"user": 5}, "user"),
    ("embeddings_too_many_inputs", "/v1/embeddings", {"input": ["a"] * 2049}, "input"),
    ("embeddings_an_empty_text_in_a_list", "/v1/embeddings", {"input": ["a", ""]}, "input"),
]


@pytest.mark.parametrize(
    "path, fields, param", [c[1:] for c in OPENAI_REFUSED], ids=[c[0] for c in OPENAI_REFUSED]
)
def test_a_bad_v1_field_is_a_400_naming_it(served, path, fields, param):
    url, _, _ = served
    response = httpx.post(f"{url}{path}", json={**VALID[path], **fields}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param.split("[")[0] in error["message"], error


def error_message(response: httpx.Response) -> str:
    """The message of either API's error shape: Ollama's ``{"error": "..."}``, OpenAI's ``{"error": {"message"}}``."""
    error = response.json()["error"]
    return error["message"] if isinstance(error, dict) else error


@pytest.mark.parametrize("levels", [65, 100_000])
@pytest.mark.parametrize("path", sorted(VALID))
def test_a_deeply_nested_body_is_a_400_on_every_route(served, path, levels):
    url, _, _ = served
    body = json.dumps(VALID[path])[:-1] + ', "x": ' + "[" * levels + "]" * levels + "}"
    response = httpx.post(f"{url}{path}", content=body.encode(), timeout=60)
    assert response.status_code == 400, response.text
    assert error_message(response).endswith("the JSON body is nested deeper than 64 levels")


# A field per route that a 5000-digit integer lands in (beyond Python's 4300-digit int parsing limit).
HUGE_INTEGER_FIELDS = {
    "/api/chat": ("options", "num_predict"),
    "/api/generate": ("options", "num_predict"),
    "/api/show": ("model",),
    "/v1/chat/completions": ("max_tokens",),
    "/v1/completions": ("max_tokens",),
    "/v1/embeddings": ("dimensions",),
    "/api/embed": ("dimensions",),
    "/api/embeddings": ("model",),
    "/tokenize": ("model",),
    "/detokenize": ("model",),
}


@pytest.mark.parametrize("path", sorted(VALID))
def test_an_integer_of_thousands_of_digits_is_a_400_naming_its_field(served, path):
    url, _, _ = served
    *parents, name = HUGE_INTEGER_FIELDS[path]
    body = mutate(VALID[path], [("set", (*parents, name), "HUGE")])
    response = httpx.post(
        f"{url}{path}", content=json.dumps(body).replace('"HUGE"', "7" * 5000).encode(), timeout=60
    )
    assert response.status_code == 400, response.text
    assert name in error_message(response)
    if name in ("num_predict", "max_tokens", "dimensions"):  # /v1/completions takes max_tokens 0 (with echo)
        assert re.search(r"an integer in [01]\.\.2147483647", error_message(response))


@pytest.mark.parametrize(
    "body, embeddings",
    [({"input": ""}, []), ({"input": []}, []), ({"input": "a"}, 1), ({"input": ["a", "b"]}, 2)],
    ids=["empty_text_loads", "empty_list_loads", "one_text", "two_texts"],
)
def test_an_empty_embed_input_loads_the_model_as_in_ollama(served, body, embeddings):
    url, _, _ = served
    response = httpx.post(f"{url}/api/embed", json={"model": "base", **body}, timeout=60)
    assert response.status_code == 200, response.text
    got = response.json()["embeddings"]
    assert got == embeddings if isinstance(embeddings, list) else len(got) == embeddings


@pytest.mark.parametrize("body", [c[1] for c in CLAMPED], ids=[c[0] for c in CLAMPED])
def test_clamped_options_answer_within_the_context(served, body):
    url, app, _ = served
    response = httpx.post(f"{url}/api/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    context = min(64, body["options"]["num_ctx"])
    assert answer["done"] and answer["prompt_eval_count"] + answer["eval_count"] <= context


def test_a_port_out_of_range_is_one_line(capsys):
    assert main(["serve", "--port", "99999", "--models", "x=/nowhere"]) == 1
    assert capsys.readouterr().err == "error: serve: --port must be in 1-65535, got 99999\n"


class GatedTokens:
    """The model's tokens, each released by the test: generation advances only when the test says so."""

    def __init__(self, tokens):
        self.tokens, self.produced = tokens, 0
        self.started, self.proceed = threading.Event(), threading.Event()

    def stream(self, prompt_ids, opts):
        for token in self.tokens.stream(prompt_ids, opts):
            self.produced += 1
            self.started.set()
            yield token
            assert self.proceed.wait(timeout=60), "the test never released the next token"


def test_a_non_streamed_request_whose_client_leaves_is_cancelled(tmp_path):
    models = load_served({"base": save_tiny_model(tmp_path / "base", None, seed=2)})
    gated = models["base:latest"].tokens = GatedTokens(models["base:latest"].tokens)
    body = json.dumps(
        {
            "model": "base",
            "prompt": "abc",
            "stream": False,
            "options": {"num_predict": 40, "temperature": 0, "stop": ["\x00"]},
        }
    ).encode()
    with running_server(models, concurrency=1) as (url, app):
        engine = app.state.engine
        host, port = urlsplit(url).hostname, urlsplit(url).port
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(
                b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            assert gated.started.wait(timeout=60)
        # The server notices the disconnect while the generation waits on its second token.
        wait_until(lambda: engine.cancelled == 1)
        gated.proceed.set()
        wait_until(lambda: not engine.slots.locked())
        assert gated.produced == 2  # the token in flight when it noticed, then no more
        after = httpx.post(
            f"{url}/api/generate",
            json={"model": "base", "prompt": "x", "stream": False, "options": {"num_predict": 3}},
            timeout=60,
        )
        assert after.status_code == 200 and after.json()["done"]


class GatedEmbeddings:
    """The model's embeddings, each released by the test: a batch advances only when the test says so."""

    def __init__(self, tokens):
        self.tokens, self.embedded = tokens, 0
        self.started, self.proceed = threading.Event(), threading.Event()

    def embed(self, ids):
        self.embedded += 1
        self.started.set()
        assert self.proceed.wait(timeout=60), "the test never released the embedding"
        return self.tokens.embed(ids)


@pytest.mark.parametrize("path", ["/api/embed", "/v1/embeddings"])
def test_an_abandoned_embedding_batch_is_cancelled_and_a_small_request_then_answers(tmp_path, path):
    models = load_served({"base": save_tiny_model(tmp_path / "base", None, seed=2)})
    gated = models["base:latest"].tokens = GatedEmbeddings(models["base:latest"].tokens)
    body = json.dumps({"model": "base", "input": [f"text {i}" for i in range(2048)]}).encode()
    with running_server(models, concurrency=1) as (url, app):
        engine = app.state.engine
        with socket.create_connection((urlsplit(url).hostname, urlsplit(url).port), timeout=30) as sock:
            sock.sendall(
                b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                % (path.encode(), len(body), body)
            )
            assert gated.started.wait(timeout=60)
        # The server notices the disconnect while the batch's first input is held; the rest is never embedded.
        wait_until(lambda: engine.cancelled == 1)
        gated.proceed.set()
        small = httpx.post(f"{url}{path}", json={"model": "base", "input": ["one"]}, timeout=60)
        assert small.status_code == 200, small.text
        assert gated.embedded == 2  # the abandoned batch's first input, then the small request's
        assert not engine.slots.locked()


def wait_until(condition, timeout: float = 60) -> None:
    event = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError("condition not reached")


# ---------------------------------------------------------------------------------------------- fuzz

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
# Values near the edges of what each option accepts, so many mutated requests still generate.
OPTION_VALUES = {
    "temperature": st.floats(min_value=-1, max_value=1e6, allow_nan=False)
    | st.sampled_from([0, 1e-300, 1e300]),
    "top_k": st.integers(min_value=-3, max_value=10**6),
    "top_p": st.floats(min_value=-0.5, max_value=1.5, allow_nan=False) | st.sampled_from([1e-300, 1.0]),
    "seed": st.integers(min_value=-1, max_value=2**64),
    "num_predict": st.integers(min_value=-3, max_value=10**9),
    "num_ctx": st.integers(min_value=-1, max_value=10**9),
    "stop": st.lists(st.text(max_size=3), max_size=3) | st.text(max_size=3),
}


def leaf_paths(value, prefix=()) -> list[tuple]:
    if isinstance(value, dict):
        children = [leaf_paths(v, (*prefix, k)) for k, v in value.items()]
    elif isinstance(value, list):
        children = [leaf_paths(v, (*prefix, i)) for i, v in enumerate(value)]
    else:
        return [prefix]
    return [prefix, *(p for c in children for p in c)] if prefix else [p for c in children for p in c]


def mutate(body: dict, edits: list) -> dict:
    out = copy.deepcopy(body)
    for kind, path, value in edits:
        *parents, last = path
        node = out
        for key in parents:
            if not isinstance(node, dict | list):
                break
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                break
        else:
            if kind == "delete" and isinstance(node, dict):
                node.pop(last, None)
            elif isinstance(node, dict) or (
                isinstance(node, list) and isinstance(last, int) and last < len(node)
            ):
                node[last] = value
    return out


OPENAI_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "max_tokens": "num_predict",
    "stop": "stop",
}


def edits_for(body: dict):
    paths = leaf_paths(body)
    if "options" in body:  # the Ollama routes
        option = st.sampled_from(sorted(OPTION_VALUES)).flatmap(
            lambda name: st.tuples(st.just("set"), st.just(("options", name)), OPTION_VALUES[name])
        )
    else:  # OpenAI's sampling fields sit at the top level
        option = st.sampled_from(sorted(OPENAI_NAMES)).flatmap(
            lambda name: st.tuples(st.just("set"), st.just((name,)), OPTION_VALUES[OPENAI_NAMES[name]])
        )
    return st.lists(
        st.one_of(
            option,
            option,
            st.tuples(st.just("set"), st.sampled_from(paths), JSON_VALUES),
            st.tuples(st.just("delete"), st.sampled_from(paths), st.none()),
            st.tuples(st.just("set"), st.tuples(st.text(max_size=6)), JSON_VALUES),
        ),
        max_size=3,
    )


def app_routes(app) -> list[tuple[str, str]]:
    return sorted(
        (method, route.path)
        for route in app.routes
        for method in getattr(route, "methods", ())
        if method in ("GET", "POST") and route.path not in ("/openapi.json",)
    )


def test_every_route_has_a_valid_request(served):
    _, app, _ = served
    posts = {path for method, path in app_routes(app) if method == "POST"}
    assert sorted(posts - set(VALID)) == []


FUZZ = {"requests": 0, "generating_requests": 0, "statuses": {}}


@settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_requests_never_get_a_5xx(served, data):
    url, app, counter = served
    FUZZ.setdefault("generations_before", counter.generations)
    method, path = data.draw(st.sampled_from(app_routes(app)))
    if method == "GET":
        response = httpx.get(f"{url}{re.sub(r'{[^}]+}', 'sft', path)}", timeout=60)
    else:
        body = mutate(VALID[path], data.draw(edits_for(VALID[path])))
        body["stream"] = data.draw(st.booleans()) if isinstance(body, dict) else None
        response = httpx.post(f"{url}{path}", content=json.dumps(body).encode(), timeout=60)
        kind = response.headers.get("content-type", "")
        if response.status_code == 200 and "ndjson" in kind:
            assert all("error" not in json.loads(line) for line in response.text.splitlines()), response.text
        if response.status_code == 200 and "event-stream" in kind:
            assert '"error"' not in response.text, response.text
    FUZZ["requests"] += 1
    FUZZ["generating_requests"] += method == "POST" and path not in NOT_GENERATING
    FUZZ["statuses"][response.status_code] = FUZZ["statuses"].get(response.status_code, 0) + 1
    assert response.status_code < 500, (method, path, response.text)


def test_after_the_fuzz_the_server_answers_and_a_share_reached_generation(served):
    url, app, counter = served
    assert FUZZ["requests"] >= 200, "run with the fuzz test"
    share = (counter.generations - FUZZ["generations_before"]) / FUZZ["generating_requests"]
    print(
        f"fuzz: {FUZZ['requests']} requests, statuses {FUZZ['statuses']}; of the "
        f"{FUZZ['generating_requests']} to generating routes, {share:.0%} reached generation"
    )
    assert share >= 0.25
    assert httpx.post(f"{url}/api/chat", json=CHAT, timeout=60).json()["done"]
    assert not app.state.engine.slots.locked()
