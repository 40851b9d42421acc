"""LoRA: train a low-rank update ``W + (alpha/rank)·(A·B)ᵀ`` of chosen linear layers, the base weights frozen.

Written from scratch in the shape of the book's appendix E (``LoRALayer`` holds A and B, ``LinearWithLoRA``
adds its output to the wrapped ``nn.Linear``) rather than with peft, because for our model it is simpler:
our GPT is a plain module whose projections are ``nn.Linear`` with known names, so wrapping them is ~100
lines, while peft brings transformers/accelerate as dependencies, renames every state-dict key behind a
``PeftModel`` wrapper and still needs our own code for the checkpoint format, the base fingerprint and the
loaders. Unlike the book (``alpha * x·A·B``) the update is scaled by ``alpha / rank``, as in the LoRA paper
and peft, so ``alpha`` means the same as in their docs and changing the rank does not change the lr.

What is trainable while adapters are on: the A and B matrices, plus the layers named in ``train_fully``
(the classifier's new head). Everything else is frozen, so the optimizer only ever sees those tensors, and a
checkpoint only needs them (``adapter_state``) plus the fingerprint of the frozen rest (``base_fingerprint``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from pipeline.common.config import LoRAParams
from pipeline.common.errors import PipelineError
from pipeline.model.gpt import GPT

# Target names users write: groups of layers, or any suffix of a linear layer's qualified name.
ALIASES: dict[str, tuple[str, ...]] = {
    "attention": ("att.qkv", "att.out_proj"),
    "mlp": ("ff.fc", "ff.gate", "ff.proj"),  # ff.gate: SwiGLU's
    "head": ("out_head",),
}
ATTRIBUTE = "lora"  # where apply_lora records what it did on the model (an ``AdapterInfo``)


class LoRALayer(nn.Module):
    """The low-rank path: x·A·B·(alpha/rank). B starts at zero, so training starts from the base model."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A @ self.B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update in ``nn.Linear``'s (out, in) layout."""
        return (self.A @ self.B).T * self.scaling


class LinearWithLoRA(nn.Module):
    def __init__(
        self, linear: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator
    ):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, generator)
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out + self.lora(self.dropout(x)) if self.enabled else out

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        linear = self.linear
        linear.weight += self.lora.delta_weight().to(linear.weight.dtype)
        return linear


@dataclass
class AdapterInfo:
    """What a directory or checkpoint must record to rebuild the adapted model on top of its base."""

    rank: int
    alpha: float
    dropout: float
    layers: list[str]  # qualified names of the wrapped linear layers
    train_fully: list[str] = field(default_factory=list)  # modules trained in full beside the adapters
    base_fingerprint: str = ""
    merge: bool = True

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "layers": self.layers,
            "train_fully": self.train_fully,
            "base_fingerprint": self.base_fingerprint,
            "merge": self.merge,
        }

    @classmethod
    def from_dict(cls, data: dict) -> AdapterInfo:
        return cls(**data)


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _short(name: str) -> str:
    """A block layer's name without its block number (blocks.3.att.qkv → att.qkv)."""
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "blocks" else name


def resolve_targets(model: GPT, targets: Sequence[str], where: str) -> list[str]:
    """Qualified names of the linear layers that ``targets`` name; a target matching nothing is an error."""
    linear = _linear_layers(model)
    known = sorted({_short(n) for n in linear})
    chosen: list[str] = []
    for target in targets:
        hits = [
            n
            for suffix in ALIASES.get(target, (target,))
            for n in linear
            if n == suffix or n.endswith("." + suffix)
        ]
        if not hits:
            raise PipelineError(
                f"{where}.targets: '{target}' matches no linear layer of the model "
                f"(targets: {', '.join(ALIASES)}, or a layer: {', '.join(known)})"
            )
        chosen += [n for n in hits if n not in chosen]
    return chosen


def base_fingerprint(model: nn.Module, names: Sequence[str] | None = None) -> str:
    """sha256 of the frozen weights by their plain names (``.linear`` wrappers left out), in name order."""
    digest = hashlib.sha256()
    state = {k.replace(".linear.", "."): v for k, v in model.state_dict().items() if ".lora." not in k}
    for name in sorted(names if names is not None else state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _frozen_names(model: nn.Module, train_fully: Sequence[str]) -> list[str]:
    """Plain names of every tensor the adapters leave untouched (a tied head's second name excluded)."""
    names = [k.replace(".linear.", ".") for k in model.state_dict() if ".lora." not in k]
    if getattr(model, "cfg", None) is not None and model.cfg.tie_weights:
        names = [n for n in names if n != "out_head.weight"]
    return [n for n in names if not any(n == m or n.startswith(m + ".") for m in train_fully)]


def apply_lora(model: GPT, params: LoRAParams, where: str, seed: int, train_fully: Sequence[str] = ()) -> GPT:
    """Freeze ``model`` and wrap the targeted layers with adapters (in place); ``rank: 0`` leaves it as it is.

    ``train_fully`` names modules that stay trainable in full (a new classification head).
    """
    if params.rank == 0:
        return model
    layers = resolve_targets(model, params.targets, where)
    linear = _linear_layers(model)
    for name in layers:
        if name == "out_head" and model.cfg.tie_weights:
            raise PipelineError(
                f"{where}.targets: the head is tied to the token embedding (model tie_weights), so "
                "merging an adapter into it would change the input embedding too; drop 'head'"
            )
        layer = linear[name]
        if params.rank > min(layer.in_features, layer.out_features):
            raise PipelineError(
                f"{where}.rank {params.rank} exceeds the size of layer {name} "
                f"({layer.in_features} → {layer.out_features})"
            )
    frozen = _frozen_names(model, train_fully)
    fingerprint = base_fingerprint(model, frozen)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in train_fully:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    for name in layers:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        wrapped = LinearWithLoRA(linear[name], params.rank, params.alpha, params.dropout, generator)
        setattr(owner, child, wrapped.to(linear[name].weight.device))
    info = AdapterInfo(
        params.rank, params.alpha, params.dropout, layers, list(train_fully), fingerprint, params.merge
    )
    setattr(model, ATTRIBUTE, info)
    return model


def adapter_info(model: nn.Module) -> AdapterInfo | None:
    """The adapters' record when ``model`` carries unmerged adapters, else None."""
    return getattr(model, ATTRIBUTE, None)


def _wrappers(model: nn.Module) -> Iterator[tuple[str, LinearWithLoRA]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LinearWithLoRA))


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model, adapters switched off (DPO's reference log-probs without a second copy of the model)."""
    wrappers = [m for _, m in _wrappers(model)]
    for m in wrappers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in wrappers:
            m.enabled = True


def merge(model: GPT) -> GPT:
    """Fold every adapter into its layer's weight (in place): a plain GPT again, everything trainable."""
    for name, wrapper in list(_wrappers(model)):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapper.merged())
    if hasattr(model, ATTRIBUTE):
        delattr(model, ATTRIBUTE)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that training changed: adapters and fully trained modules (names as in the wrapped model)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``adapter_state`` output into a model wrapped the same way; names and shapes must match exactly."""
    own = dict(model.named_parameters())
    expected = {n for n, p in own.items() if p.requires_grad}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise PipelineError(
            f"{origin}: adapter does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if own[name].shape != tensor.shape:
                raise PipelineError(
                    f"{origin}: {name} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}"
                )
            own[name].copy_(tensor)


def rebuild(model: GPT, info: AdapterInfo, origin: str) -> GPT:
    """Wrap a base model as ``info`` records (same layers, same shapes), after checking it is the same base."""
    frozen = _frozen_names(model, info.train_fully)
    found = base_fingerprint(model, frozen)
    if found != info.base_fingerprint:
        raise PipelineError(
            f"{origin}: adapter was trained on base weights {info.base_fingerprint[:12]}, "
            f"but its base is now {found[:12]} (retrain the adapter)"
        )
    params = LoRAParams(
        rank=info.rank, alpha=info.alpha, dropout=info.dropout, targets=tuple(info.layers), merge=info.merge
    )
    return apply_lora(model, params, origin, seed=0, train_fully=info.train_fully)


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), a tied tensor counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)
