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
    """One forward pass over ``ids`` (2 ≤ len ≤ context_length), log-softmax in float32."""
    if not 2 <= len(ids) <= model.cfg.context_length:
        raise ValueError(f"scoring needs 2..{model.cfg.context_length} tokens, got {len(ids)}")
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
