"""The objectives' arithmetic: next-token cross-entropy (pretraining and SFT) and DPO."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = (
    -100
)  # the target value the losses skip (padding, masked prompt); torch's cross-entropy default


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over targets that are not IGNORE_INDEX (padding, masked prompt)."""
    # (B·T, V) against (B·T,), as the book's calc_loss_batch flattens them; fp32 for the softmax over the vocabulary
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Per-sequence log-probability of the unmasked targets, (B,): their sum or their per-token mean."""
    mask = targets != IGNORE_INDEX  # (B, T): False on the prompt and the padding
    safe = targets.masked_fill(~mask, 0)  # gather needs a valid index; these positions are masked out below
    logps = (
        torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    )  # (B, T), in fp32
    total = (logps * mask).sum(dim=-1)  # masked positions contribute nothing
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum(dim=-1).clamp(min=1)  # clamp: a row with no target gives 0, not NaN
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """−log σ(β·[(log πθ(c) − log πref(c)) − (log πθ(r) − log πref(r))]), with TRL's metric names."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)  # DPO's implicit reward: β·log(πθ / πref)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    margins = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(margins).mean()  # logsigmoid, not log(sigmoid()): finite for large negative margins
    metrics = {  # detached: logged, never differentiated
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/margins": margins.detach().mean(),
        "rewards/accuracies": (margins.detach() > 0).float().mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
    return loss, metrics
