"""Text embeddings from our GPT: the final hidden states (after the last norm, before the vocabulary head),
mean-pooled over the input's tokens and L2-normalised, so that a dot product of two embeddings is their cosine.

This is what Ollama's ``/api/embed`` returns for a generative model; a GPT trained only to predict the next token
is no sentence encoder, so expect rough similarities rather than a retrieval model's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.model.gpt import GPT


@torch.inference_mode()
def final_hidden_states(model: GPT, ids: Sequence[int]) -> torch.Tensor:
    """(len(ids), n_embd): the residual stream after ``final_norm``, i.e. what the head reads."""
    idx = torch.tensor([list(ids)], dtype=torch.long)
    x = model.embed(idx)
    for block in model.blocks:
        x, _ = block(x)
    return model.final_norm(x)[0]


def embed(model: GPT, ids: Sequence[int]) -> list[float]:
    """The mean of the final hidden states over ``ids`` (1 ≤ len ≤ context_length), scaled to unit length."""
    if not 1 <= len(ids) <= model.cfg.context_length:
        raise ValueError(f"an embedding needs 1..{model.cfg.context_length} tokens, got {len(ids)}")
    pooled = final_hidden_states(model, ids).mean(dim=0)
    return torch.nn.functional.normalize(pooled, dim=0).tolist()
