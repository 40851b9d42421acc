"""Text generation with the KV cache: repeat penalty, temperature, top-k, top-p, EOS stop, seeded."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.model.gpt import GPT
from pipeline.model.sampling import SamplingOptions


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest nucleus of mass top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[
            ..., -1:
        ]  # (..., 1): the k-th largest, broadcast per row
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th survive
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back from sorted order to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def penalize_repeats(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """llama.cpp's repeat penalty on logits (B, V): each token id in its row of ``history`` (B, n), counted
    once however often it occurs, has a positive logit divided by ``penalty`` and a negative one multiplied."""
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, history, True)
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample_next(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, V)."""
    if opts.temperature == 0:  # greedy
        return logits.argmax(dim=-1, keepdim=True)
    # Shifted so the best logit is 0 before dividing: any temperature > 0 (even 1e-300) stays finite.
    logits = logits.double()  # fp64: such temperatures lie below fp32's range
    logits = filter_logits(
        (logits - logits.amax(dim=-1, keepdim=True)) / opts.temperature, opts.top_k, opts.top_p
    )
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(
        probs, num_samples=1, generator=generator
    )  # seeded: the same options, the same text


@torch.inference_mode()
def stream_tokens(model: GPT, prompt_ids: torch.Tensor, opts: SamplingOptions) -> Iterator[torch.Tensor]:
    """Yield next-token ids (B, 1) one step at a time, reusing the KV cache.

    Stops after ``max_new_tokens``, when every row has produced ``eos_id``, or when the context is full.
    """
    model.eval()
    device = prompt_ids.device
    generator = torch.Generator(device=device).manual_seed(
        opts.seed
    )  # on the model's device: multinomial draws there
    limit = min(
        opts.max_new_tokens, model.cfg.context_length - prompt_ids.shape[1]
    )  # prompt + new fit the context
    if limit <= 0:
        return
    finished = torch.zeros(prompt_ids.shape[0], 1, dtype=torch.bool, device=device)  # (B, 1)
    window = opts.repeat_window(model.cfg.context_length)
    history = prompt_ids[:, -window:] if opts.penalizes else None  # the tokens the penalty sees
    logits, past = model(
        prompt_ids, last_only=True
    )  # prefill: the whole prompt in one forward, its cache kept
    for step in range(limit):
        last = logits[:, -1, :]
        if history is not None:
            last = penalize_repeats(last, history, opts.repeat_penalty)
        nxt = sample_next(last, opts, generator)  # (B, 1)
        if opts.eos_id is not None:
            nxt = nxt.masked_fill(
                finished, opts.eos_id
            )  # finished rows keep receiving eos_id: the batch stays rectangular
            finished |= nxt == opts.eos_id
        yield nxt
        if history is not None:
            history = torch.cat([history, nxt], dim=1)[:, -window:]
        if bool(finished.all()) or step == limit - 1:  # no forward for a token that will not be sampled
            return
        logits, past = model(
            nxt, past=past, last_only=True
        )  # decode: one new token, the cache holds the rest


def generate(model: GPT, prompt_ids: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """Prompt followed by the generated tokens, (B, T + new). The EOS token, if produced, is kept."""
    new = list(stream_tokens(model, prompt_ids, opts))
    return torch.cat([prompt_ids, *new], dim=1)


@torch.inference_mode()
def generate_without_cache(model: GPT, prompt_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The textbook greedy loop: re-run the whole sequence and every position's logits each step.

    Kept as the reference that the KV-cache path must match token for token, and as the benchmark baseline.
    """
    model.eval()
    ids = prompt_ids
    for _ in range(min(max_new_tokens, model.cfg.context_length - prompt_ids.shape[1])):
        logits, _ = model(ids)  # (B, T, V): every position, though only the last is used
        ids = torch.cat([ids, logits[:, -1, :].argmax(dim=-1, keepdim=True)], dim=1)
    return ids
