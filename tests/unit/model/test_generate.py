"""Generation: the KV-cache path equals the textbook no-cache loop; sampling options behave."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.generate import (
    filter_logits,
    generate,
    generate_without_cache,
    penalize_repeats,
    stream_tokens,
)
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.sampling import SamplingOptions


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=211, context_length=96, n_embd=48, n_head=4, n_layer=3)).eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_kv_cache_greedy_equals_no_cache_greedy(model, batch):
    prompt = torch.randint(0, 211, (batch, 12), generator=torch.Generator().manual_seed(batch))
    cached = generate(model, prompt, SamplingOptions(max_new_tokens=60, temperature=0))
    naive = generate_without_cache(model, prompt, max_new_tokens=60)
    assert cached.shape == (batch, 72)
    assert torch.equal(cached, naive)


@pytest.mark.parametrize(
    "options",
    [
        {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True},
        {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "relu2", "qk_norm": True},
    ],
)
def test_kv_cache_generation_equals_full_recompute_with_architecture_options(options):
    torch.manual_seed(0)
    modern = GPT(
        GPTConfig(vocab_size=211, context_length=96, n_embd=48, n_head=4, n_layer=3, **options)
    ).eval()
    prompt = torch.randint(0, 211, (2, 12), generator=torch.Generator().manual_seed(3))
    cached = generate(modern, prompt, SamplingOptions(max_new_tokens=40, temperature=0))
    assert torch.equal(cached, generate_without_cache(modern, prompt, max_new_tokens=40))
    with torch.inference_mode():
        logits, past = modern(cached[:, :12])
        steps = [logits[:, -1]]
        for i in range(12, cached.shape[1] - 1):
            logits, past = modern(cached[:, i : i + 1], past=past)
            steps.append(logits[:, -1])
        full, _ = modern(cached[:, :-1])
    assert torch.allclose(torch.stack(steps, dim=1), full[:, 11:], atol=1e-5)


def test_same_seed_same_sample_different_seed_different_sample(model):
    prompt = torch.randint(0, 211, (1, 5), generator=torch.Generator().manual_seed(0))
    opts = SamplingOptions(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.95, seed=11)
    a, b = generate(model, prompt, opts), generate(model, prompt, opts)
    c = generate(
        model, prompt, SamplingOptions(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.95, seed=12)
    )
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generation_stops_at_eos_and_at_the_context_limit(model):
    prompt = torch.randint(0, 211, (1, 4), generator=torch.Generator().manual_seed(1))
    greedy = generate(model, prompt, SamplingOptions(max_new_tokens=10, temperature=0))
    eos = int(greedy[0, 6])  # make the third generated token the EOS
    stopped = generate(model, prompt, SamplingOptions(max_new_tokens=10, temperature=0, eos_id=eos))
    first = int((greedy[0, 4:] == eos).nonzero()[0])
    assert stopped.shape[1] == 4 + first + 1 and int(stopped[0, -1]) == eos
    full = generate(
        model, torch.zeros(1, 90, dtype=torch.long), SamplingOptions(max_new_tokens=50, temperature=0)
    )
    assert full.shape[1] == 96


def test_top_k_keeps_k_tokens_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=None)).sum() == 2
    probs = torch.softmax(logits, dim=-1)[0]  # ≈ [0.64, 0.24, 0.09, 0.03, 0.01]
    kept = torch.isfinite(filter_logits(logits, top_k=None, top_p=0.8))[0]
    assert kept.tolist() == [True, True, False, False, False]
    assert probs[:1].sum() < 0.8 <= probs[:2].sum()
    assert torch.isfinite(filter_logits(logits, top_k=None, top_p=0.1)).sum() == 1


def test_top_k_one_is_greedy(model):
    prompt = torch.randint(0, 211, (1, 6), generator=torch.Generator().manual_seed(2))
    sampled = generate(model, prompt, SamplingOptions(max_new_tokens=20, temperature=0.7, top_k=1, seed=5))
    assert torch.equal(sampled, generate_without_cache(model, prompt, 20))


def test_streaming_yields_one_token_per_step(model):
    prompt = torch.randint(0, 211, (2, 3), generator=torch.Generator().manual_seed(3))
    steps = list(stream_tokens(model, prompt, SamplingOptions(max_new_tokens=7, temperature=0)))
    assert len(steps) == 7 and all(s.shape == (2, 1) for s in steps)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_k": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"max_new_tokens": -1},
        {"repeat_penalty": 0.0},
        {"repeat_penalty": float("inf")},
        {"repeat_penalty": float("nan")},
        {"repeat_last_n": -2},
    ],
)
def test_invalid_sampling_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingOptions(**kwargs)


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens_once():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    history = torch.tensor([[0, 1, 1, 1]])  # token 1 three times: penalised once, as llama.cpp does
    out = penalize_repeats(logits, history, 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5]]


def _greedy_with_penalty(model, prompt, steps, penalty, last_n):
    """The penalty by hand: full recompute each step, the last ``last_n`` ids of prompt + answer penalised."""
    ids = prompt
    for _ in range(steps):
        logits = model(ids)[0][:, -1, :]
        window = ids[:, -last_n:]
        logits = torch.stack(
            [
                torch.where(
                    torch.isin(torch.arange(logits.shape[-1]), row_ids),
                    torch.where(row > 0, row / penalty, row * penalty),
                    row,
                )
                for row, row_ids in zip(logits, window, strict=True)
            ]
        )
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.inference_mode()
@pytest.mark.parametrize("last_n", [3, 64])
def test_kv_cache_generation_with_repeat_penalty_equals_the_penalty_by_hand(model, last_n):
    torch.manual_seed(3)
    prompt = torch.randint(0, 211, (2, 5))
    opts = SamplingOptions(max_new_tokens=12, temperature=0, repeat_penalty=1.8, repeat_last_n=last_n)
    assert torch.equal(generate(model, prompt, opts), _greedy_with_penalty(model, prompt, 12, 1.8, last_n))
    plain = generate(model, prompt, SamplingOptions(max_new_tokens=12, temperature=0))
    assert not torch.equal(plain, generate(model, prompt, opts))  # the penalty changed the answer


def test_repeat_penalty_off_when_one_or_no_window(model):
    prompt = torch.randint(0, 211, (1, 5))
    plain = generate(model, prompt, SamplingOptions(max_new_tokens=8, temperature=0))
    for opts in ({"repeat_penalty": 1.0}, {"repeat_penalty": 1.5, "repeat_last_n": 0}):
        assert torch.equal(
            generate(model, prompt, SamplingOptions(max_new_tokens=8, temperature=0, **opts)), plain
        )
