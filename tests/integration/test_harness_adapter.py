"""PipelineLM, our lm-evaluation-harness model, on a tiny model directory: its rolling log-likelihood is the
model's own (one forward pass, checked here apart from the adapter, and in windows past the context), its greedy
generations are the server's temperature-0 completions cut at the harness's stop strings."""

from __future__ import annotations

import openai
import pytest
import torch
from lm_eval.api.instance import Instance

from pipeline.evaluation.harness import PipelineLM
from pipeline.model.checkpoint import load_model
from tests.helpers.serving import load_served, running_server, save_tiny_model

TOLERANCE = 1e-4  # float32 sums of the same log-softmax, batched or not


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(
        tmp_path_factory.mktemp("harness") / "base", template=None, context_length=64, seed=3
    )


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def own_sum(model_dir, ids: list[int]) -> float:
    """log p(ids[1:] | ids[:1]...) computed here with a plain forward pass and log_softmax."""
    model, _ = load_model(model_dir)
    with torch.no_grad():
        logits, _ = model.eval()(torch.tensor([ids[:-1]]))
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    return float(logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum())


def test_rolling_loglikelihood_is_the_models_own(model_dir):
    lm = PipelineLM(model_dir)
    short = "Hola, mundo."
    [got] = lm.loglikelihood_rolling([request("loglikelihood_rolling", short)])
    # the first token is predicted from end-of-text, as the harness's prefix token
    assert abs(got - own_sum(model_dir, [lm.eot_token_id, *short.encode()])) < TOLERANCE
    long = "En un lugar de la Mancha, de cuyo nombre no quiero acordarme, no ha mucho tiempo que vivía un hidalgo."
    assert len(long.encode()) > 64  # past the context: disjoint windows, each scored once
    [windowed] = lm.loglikelihood_rolling([request("loglikelihood_rolling", long)])
    ids = [lm.eot_token_id, *long.encode()]
    # window 1 predicts the first 64 tokens from end-of-text on; window 2 the rest, from the 64 ids before each
    first = own_sum(model_dir, ids[:65])
    rest = own_sum(model_dir, ids[len(ids) - 65 :]) - own_sum(model_dir, ids[len(ids) - 65 : 65])
    assert abs(windowed - (first + rest)) < 10 * TOLERANCE


def test_loglikelihood_matches_rolling_on_a_split_text(model_dir):
    lm = PipelineLM(model_dir, batch_size=2)
    pairs = [("Hola", ", mundo."), ("En un lugar", " de la Mancha"), ("a", "b")]
    got = lm.loglikelihood([request("loglikelihood", c, t) for c, t in pairs])
    for (context, target), (logprob, _) in zip(pairs, got, strict=True):
        ids = list((context + target).encode())
        expected = (
            own_sum(model_dir, ids) - own_sum(model_dir, ids[: len(context.encode())])
            if len(context.encode()) > 1
            else own_sum(model_dir, ids)
        )
        assert abs(logprob - expected) < TOLERANCE


def test_greedy_generation_is_the_servers_temperature_zero_completion(model_dir):
    lm = PipelineLM(model_dir)
    prompt = "En un lugar"
    [full] = lm.generate_until([request("generate_until", prompt, {"until": [], "max_gen_toks": 12})])
    with running_server(load_served({"base": model_dir})) as (url, _):
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        served = api.completions.create(model="base", prompt=prompt, temperature=0, max_tokens=12)
    assert full == served.choices[0].text and len(full) > 0
    stop = full[2:4]
    [cut] = lm.generate_until([request("generate_until", prompt, {"until": [stop], "max_gen_toks": 12})])
    assert cut == full[: full.index(stop)]
