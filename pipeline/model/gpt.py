"""The one GPT every stage uses: GPT-2 shaped, pre-LN, SDPA attention, optional weight tying, KV cache.

Names follow "Build a Large Language Model (From Scratch)": MultiHeadAttention, FeedForward,
TransformerBlock, and the model itself (`GPT`, also exported as `GPTModel`).

The defaults are the book's GPT-2. Four options swap in what later models use: rotary position embeddings
(``pos_emb: rope``, RoFormer; no position table), RMSNorm (``norm: rmsnorm``), a ReLU² or SwiGLU MLP
(``mlp``) and RMSNorm on each head's queries and keys (``qk_norm``). GPT-2's file formats hold none of them.

The KV cache is explicit tensors in and out (``past`` / ``present``), not hidden module state: the
torch generator, the ONNX export and the server all drive the same forward.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.common.errors import PipelineError

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
# The architecture options and their values; the first value of each is GPT-2's (the default).
CHOICES: dict[str, tuple[str, ...]] = {
    "pos_emb": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "relu2", "swiglu"),
}


class ModelConfigError(PipelineError, ValueError):
    """A model shape that cannot be built; the message names the offending field."""


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    dropout: float = 0.0
    qkv_bias: bool = False
    tie_weights: bool = True
    n_classes: int = 0  # > 0: a classifier (the book's ch. 6): an n-class head instead of the vocabulary head
    pos_emb: str = "learned"  # learned: GPT-2's position table | rope: rotary embeddings of q and k
    rope_base: float = 10000.0  # rope: the wavelength base of the rotation frequencies
    norm: str = "layernorm"  # layernorm | rmsnorm (every norm of the model)
    mlp: str = "gelu"  # gelu (GPT-2) | relu2: relu(x)² | swiglu: silu(gate(x)) · fc(x), hidden ≈ 8/3·d
    qk_norm: bool = False  # RMSNorm on each head's q and k (before rope)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelConfigError(f"model.{name} must be an integer, got {value!r}")
            if value <= 0:
                raise ModelConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ModelConfigError(f"model.n_head={self.n_head} does not divide model.n_embd={self.n_embd}")
        for name in ("qkv_bias", "tie_weights", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ModelConfigError(f"model.{name} must be true or false, got {getattr(self, name)!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ModelConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.n_classes < 0 or (self.n_classes and self.tie_weights):
            raise ModelConfigError(
                f"model.n_classes={self.n_classes} needs n_classes >= 0 and an untied head"
            )
        self._check_architecture()

    def _check_architecture(self) -> None:
        """The options beyond GPT-2: known values, a positive rope base, and an even head size for rope's pairs."""
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                options = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
                raise ModelConfigError(f"model.{name} must be {options}, got {getattr(self, name)!r}")
        base = self.rope_base
        if (
            isinstance(base, bool)
            or not isinstance(base, int | float)
            or not math.isfinite(base)
            or base <= 0
        ):
            raise ModelConfigError(f"model.rope_base must be a positive number, got {base!r}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ModelConfigError(
                f"model.pos_emb=rope rotates pairs of dimensions: the head size "
                f"n_embd / n_head must be even, got {self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's inner width: 4·d, or for SwiGLU 8/3·d rounded to a multiple of 64 (three matrices, about
        the parameters of two 4·d ones)."""
        if self.mlp != "swiglu":
            return 4 * self.n_embd
        return max(64, 64 * round(8 * self.n_embd / 3 / 64))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**data)


# Named shapes. `gpt2-124m` is the book's GPT_CONFIG_124M (with the tied head that makes it 124M).
PRESETS: dict[str, GPTConfig] = {
    "cpu-tiny": GPTConfig(vocab_size=4096, context_length=64, n_embd=64, n_head=4, n_layer=2),
    "cpu-small": GPTConfig(vocab_size=4096, context_length=128, n_embd=256, n_head=4, n_layer=4),
    "cpu-medium": GPTConfig(vocab_size=8192, context_length=256, n_embd=384, n_head=6, n_layer=6),
    "gpt2-124m": GPTConfig(
        vocab_size=50257, context_length=1024, n_embd=768, n_head=12, n_layer=12, dropout=0.1
    ),
    "gpt2-355m": GPTConfig(
        vocab_size=50257, context_length=1024, n_embd=1024, n_head=16, n_layer=24, dropout=0.1
    ),
    "gpt2-774m": GPTConfig(
        vocab_size=50257, context_length=1024, n_embd=1280, n_head=20, n_layer=36, dropout=0.1
    ),
}


def config_from_preset(preset: str, **overrides) -> GPTConfig:
    """A preset with some fields replaced (``None`` overrides are ignored)."""
    if preset not in PRESETS:
        raise ModelConfigError(f"unknown model preset '{preset}' (known: {', '.join(PRESETS)})")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def make_norm(cfg: GPTConfig, size: int) -> nn.Module:
    """The model's norm over the last ``size`` features: GPT-2's LayerNorm or RMSNorm (same eps)."""
    return nn.RMSNorm(size, eps=1e-5) if cfg.norm == "rmsnorm" else nn.LayerNorm(size)


def rope_angles(
    start: int | torch.Tensor, length: int, head_dim: int, base: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (length, 1, head_dim / 2), of positions start..start+length-1: computed, not stored, so a
    model built on the meta device or loaded from a file needs no buffer (their cost is a vector per layer)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    positions = (start + torch.arange(length, device=device)).float()
    angles = (positions[:, None] * inv_freq[None, :]).unsqueeze(1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + head_dim/2]) of ``x`` (B, T, H, head_dim) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class MultiHeadAttention(nn.Module):
    """Causal self-attention through ``scaled_dot_product_attention`` (flash/memory-efficient kernels)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.rope_base = cfg.rope_base if cfg.pos_emb == "rope" else None
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-5), nn.RMSNorm(cfg.head_dim, eps=1e-5)

    def project(
        self, x: torch.Tensor, start: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, T, n_head, head_dim) for tokens at positions start..: q and k normalised (qk_norm), then
        rotated (rope). The ONNX export calls this too, so both compute the same heads."""
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, self.head_dim) for z in self.qkv(x).split(c, dim=2))
        if self.qk_norm:  # in fp32: RMSNorm's fused kernel wants input and weight in one dtype
            q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        if self.rope_base is not None:
            cos, sin = rope_angles(start, t, self.head_dim, self.rope_base, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, c = x.shape
        q, k, v = (z.transpose(1, 2) for z in self.project(x, 0 if past is None else past[0].shape[2]))
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        dropout = self.dropout if self.training else 0.0
        if past is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif t == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            # New queries sit at the end of the sequence: query i may see keys up to past_len + i.
            past_len = k.shape[2] - t
            rows = torch.arange(t, device=x.device).unsqueeze(1) + past_len
            mask = torch.arange(k.shape[2], device=x.device).unsqueeze(0) <= rows
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.out_proj(y), (k, v)


class FeedForward(nn.Module):
    """GPT-2's GELU MLP (``fc`` up, ``proj`` down), ReLU² on the same widths, or SwiGLU (a ``gate`` beside ``fc``)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden)
        if cfg.mlp == "swiglu":
            self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.proj(F.silu(self.gate(x)) * self.fc(x))
        if self.kind == "relu2":
            return self.proj(F.relu(self.fc(x)).square())
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.n_embd)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = make_norm(cfg, cfg.n_embd)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, past=None):
        a, present = self.att(self.norm1(x), past)
        x = x + self.drop(a)
        x = x + self.drop(self.ff(self.norm2(x)))
        return x, present


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # rope: positions enter attention as rotations, so there is no position table
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.drop_emb = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.final_norm = make_norm(cfg, cfg.n_embd)
        self.out_head = nn.Linear(cfg.n_embd, cfg.n_classes or cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled down so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "ff.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (shared tensors once); position embeddings excluded by default, as in nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding and self.pos_emb is not None else n

    def embed(self, idx: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """The residual stream's start for tokens at positions start..: token embeddings plus, with learned
        positions, their rows of the position table (rope adds positions in attention instead)."""
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(start + torch.arange(idx.shape[1], device=idx.device))
        return self.drop_emb(x)

    def forward(
        self,
        idx: torch.Tensor,
        past: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, KVCache]:
        """Logits for ``idx`` (B, T) continuing after ``past``; returns (logits, present KV cache).

        ``last_only`` computes the vocabulary head for the final position only (generation needs no more).
        """
        _, t = idx.shape
        start = 0 if past is None else past[0][0].shape[2]
        if start + t > self.cfg.context_length:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds context_length={self.cfg.context_length}"
            )
        x = self.embed(idx, start)
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i])
            present.append(kv)
        x = self.final_norm(x)
        if last_only:
            x = x[:, -1:, :]
        return self.out_head(x), present

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matrices (dim ≥ 2), none on biases, norms and nothing twice."""
        params = {id(p): p for p in self.parameters() if p.requires_grad}.values()
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


GPTModel = GPT


def last_token_logits(model: nn.Module, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, n_out): the head's output at each row's last real token of right-padded ``idx`` (the book's
    classifier reads the last token; under the causal mask it has seen the whole text and none of the padding)."""
    logits, _ = model(idx)
    return logits[torch.arange(idx.shape[0], device=idx.device), lengths - 1]


def flops_per_token(cfg: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6N + 12·L·d·T (PaLM appendix B)."""
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * seq_len
