"""Log-probabilities of a token sequence under our GPT: each token's given the ones before it, and the most likely
tokens at each position. This is what ``logprobs``/``echo`` on ``/v1/completions`` and the lm-evaluation-harness
adapter (pipeline/evaluation/harness.py) score with.

It knows the model core only: no tokenizer, no text, no API shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.model.gpt import GPT


@dataclass
class Scored:
    """Per position i ≥ 1 of the scored ids: ``logprobs[i-1]`` = log p(ids[i] | ids[:i]), ``top[i-1]`` the
    ``k`` likeliest (id, log-probability) there, likeliest first, and ``greedy[i-1]`` whether ids[i] is the argmax."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    greedy: list[bool]


@torch.inference_mode()
def score_ids(model: GPT, ids: Sequence[int], k: int = 0) -> Scored:
    """One forward pass over ``ids[:-1]`` (2 ≤ len(ids) ≤ context_length + 1: the last id is only predicted),
    log-softmax in float32."""
    if not 2 <= len(ids) <= model.cfg.context_length + 1:
        raise ValueError(f"scoring needs 2..{model.cfg.context_length + 1} tokens, got {len(ids)}")
    model.eval()
    idx = torch.tensor([list(ids)], dtype=torch.long, device=next(model.parameters()).device)
    logits, _ = model(idx[:, :-1])
    logp = torch.log_softmax(logits[0].float(), dim=-1)  # (T-1, V): the distribution over each next token
    targets = idx[0, 1:]
    chosen = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    greedy = (logp.argmax(dim=-1) == targets).tolist()
    top: list[list[tuple[int, float]]] = [[] for _ in range(len(targets))]
    if k > 0:
        values, indices = logp.topk(k, dim=-1)
        top = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    return Scored(chosen.tolist(), top, greedy)


@torch.inference_mode()
def score_batch(model: GPT, rows: Sequence[Sequence[int]]) -> list[tuple[list[float], list[bool]]]:
    """``score_ids`` without the top-k for several id lists (each 2..context_length + 1) in one forward pass: each
    row is padded at its end, which the causal mask keeps from every real position. Per row, (log-probabilities,
    greedy flags) of ids[1:]."""
    if any(not 2 <= len(ids) <= model.cfg.context_length + 1 for ids in rows):
        raise ValueError(f"scoring needs 2..{model.cfg.context_length + 1} tokens per row")
    model.eval()
    width = max(len(ids) for ids in rows)
    device = next(model.parameters()).device
    idx = torch.tensor(
        [list(ids) + [0] * (width - len(ids)) for ids in rows], dtype=torch.long, device=device
    )
    logits, _ = model(idx[:, :-1])
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, width-1, V)
    targets = idx[:, 1:]
    chosen = logp.gather(2, targets.unsqueeze(2)).squeeze(2)
    greedy = logp.argmax(dim=-1) == targets
    return [
        (chosen[i, : len(ids) - 1].tolist(), greedy[i, : len(ids) - 1].tolist()) for i, ids in enumerate(rows)
    ]
