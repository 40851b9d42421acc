"""The optimizers the one training loop can use: AdamW (the book's), or Muon for the blocks' matrices.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers") replaces each weight matrix's update by the
nearest semi-orthogonal matrix to its Nesterov momentum, found with five quintic Newton–Schulz iterations. It
suits only the 2-D weights inside the transformer blocks; embeddings, the head, norms and biases keep AdamW.
Both kinds live in one ``torch.optim.Optimizer`` so the loop's scheduler, checkpoint and resume see one
optimizer and one state dict, whichever is chosen.

The Newton–Schulz matmuls run in the dtype the stage measured faster on this machine (``pipeline.model.runtime``):
torch's own ``torch.optim.Muon`` always uses bf16, which is the slower dtype on CPUs without fast bf16.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # the quintic's (a, b, c), as in torch.optim.Muon


def newton_schulz(g: torch.Tensor, steps: int, dtype: torch.dtype, eps: float = 1e-7) -> torch.Tensor:
    """An approximately semi-orthogonal matrix near ``g`` (its singular values pushed towards 1), in ``dtype``."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a·x + (b·G + c·G²)·x
    return x.T if transposed else x


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the groups marked ``muon: True``, AdamW (decoupled weight decay, bias-corrected) for the rest.

    Muon's update is scaled by ``0.2·sqrt(max(rows, cols))`` so its RMS matches AdamW's (torch's
    ``adjust_lr_fn="match_rms_adamw"``): one learning rate and one schedule serve both kinds of weight.
    """

    def __init__(
        self,
        groups: Iterable[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        momentum: float = 0.95,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
        eps: float = 1e-8,
    ):
        super().__init__(
            list(groups),
            dict(
                lr=lr,
                betas=betas,
                momentum=momentum,
                ns_steps=ns_steps,
                eps=eps,
                weight_decay=0.0,
                muon=False,
            ),
        )
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])
                if group["muon"]:
                    self._muon_update(p, group)
                else:
                    self._adamw_update(p, group)

    def _muon_update(self, p: torch.Tensor, group: dict) -> None:
        buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        buf.lerp_(p.grad, 1 - group["momentum"])
        nesterov = p.grad.lerp(buf, group["momentum"])
        update = newton_schulz(nesterov, group["ns_steps"], self.ns_dtype)
        scale = 0.2 * math.sqrt(max(p.shape))
        p.add_(update.to(p.dtype), alpha=-group["lr"] * scale)

    def _adamw_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)


def muon_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Muon for the 2-D weights inside ``model.blocks``; AdamW for the rest (decay on matrices only)."""
    params = {id(p): (name, p) for name, p in model.named_parameters() if p.requires_grad}.values()
    hidden = [p for name, p in params if name.startswith("blocks.") and p.dim() == 2]
    chosen = {id(p) for p in hidden}
    rest = [p for _, p in params if id(p) not in chosen]
    groups = [
        {"params": hidden, "weight_decay": weight_decay, "muon": True},
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "muon": False},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "muon": False},
    ]
    return [g for g in groups if g["params"]]
