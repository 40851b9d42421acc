"""The one GPT every stage uses: GPT-2 shaped, pre-LN, SDPA attention, optional weight tying, KV cache.

Names follow "Build a Large Language Model (From Scratch)": MultiHeadAttention, FeedForward,
TransformerBlock, and the model itself (`GPT`, also exported as `GPTModel`).

The defaults are the book's GPT-2. Options swap in what later models use, so the same classes are also the
Llama family (Llama 3.x, SmolLM2, Qwen3; the book's bonus chapters build them the same way):

- rotary position embeddings (``pos_emb: rope``, RoFormer; no position table) with ``rope_base`` and Llama 3's
  frequency scaling (``rope_factor`` and its three companions; factor 1 scales nothing);
- RMSNorm (``norm: rmsnorm``, eps ``norm_eps``), a ReLU² or SwiGLU MLP (``mlp``, width ``hidden_dim``);
- grouped-query attention (``n_kv_head`` key/value heads, each shared by ``n_head / n_kv_head`` query heads),
  a head size of its own (``head_size``: Qwen3's heads are wider than ``n_embd / n_head``);
- no biases in the projections (``bias: false``; ``qkv_bias`` alone, Qwen2's, stays separate) and Qwen3's
  RMSNorm on each head's queries and keys (``qk_norm``).

GPT-2's file formats hold none of them; the Llama family's (model/llama_layout.py) hold the Llama-shaped ones.

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

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # one (k, v) per layer, each (B, n_head, T_past, head_dim)
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
    vocab_size: int = 50257  # GPT-2's BPE vocabulary
    context_length: int = 1024  # the most positions one forward sees (nanoGPT's block_size)
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    dropout: float = 0.0
    qkv_bias: bool = False  # the book's GPT_CONFIG_124M has none; OpenAI's GPT-2 checkpoints do
    tie_weights: bool = True  # out_head shares tok_emb's matrix, as GPT-2 does
    n_classes: int = 0  # > 0: a classifier (the book's ch. 6): an n-class head instead of the vocabulary head
    pos_emb: str = "learned"  # learned: GPT-2's position table | rope: rotary embeddings of q and k
    rope_base: float = 10000.0  # rope: the wavelength base of the rotation frequencies
    norm: str = "layernorm"  # layernorm | rmsnorm (every norm of the model)
    mlp: str = "gelu"  # gelu (GPT-2) | relu2: relu(x)² | swiglu: silu(gate(x)) · fc(x), hidden ≈ 8/3·d
    qk_norm: bool = False  # RMSNorm on each head's q and k (before rope)
    n_kv_head: int | None = None  # grouped-query attention: key/value heads (None: n_head, plain multi-head)
    head_size: int | None = None  # each head's width (None: n_embd / n_head)
    hidden_dim: int | None = None  # the MLP's inner width (None: 4·d, or about 8/3·d for SwiGLU)
    bias: bool = True  # biases of out_proj and the MLP's layers (the Llama family has none)
    norm_eps: float = 1e-5  # the norms' epsilon (Qwen3: 1e-6)
    # Llama 3's rope frequency scaling (factor 1: none): long wavelengths divided by rope_factor, short ones kept,
    # those between blended; the wavelength bounds are rope_original_context / the two freq factors.
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelConfigError(f"model.{name} must be an integer, got {value!r}")
            if value <= 0:
                raise ModelConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("n_kv_head", "head_size", "hidden_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ModelConfigError(f"model.{name} must be a positive integer or null, got {value!r}")
        if self.head_size is None and self.n_embd % self.n_head:
            raise ModelConfigError(f"model.n_head={self.n_head} does not divide model.n_embd={self.n_embd}")
        if self.n_head % self.kv_heads:
            raise ModelConfigError(
                f"model.n_kv_head={self.kv_heads} must divide model.n_head={self.n_head} "
                "(each key/value head serves a whole group of query heads)"
            )
        for name in ("qkv_bias", "tie_weights", "qk_norm", "bias"):
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
        for name in ("norm_eps", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ModelConfigError(f"model.{name} must be a positive number, got {value!r}")
        if self.rope_factor != 1.0 and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ModelConfigError(
                f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                f"model.rope_low_freq_factor={self.rope_low_freq_factor}"
            )
        original = self.rope_original_context
        if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
            raise ModelConfigError(
                f"model.rope_original_context must be a positive integer, got {original!r}"
            )
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ModelConfigError(
                f"model.pos_emb=rope rotates pairs of dimensions: the head size "
                f"n_embd / n_head must be even, got {self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, or one per query head."""
        return self.n_kv_head or self.n_head

    @property
    def rope_scaling(self) -> tuple[float, float, float, int] | None:
        """Llama 3's (factor, low_freq_factor, high_freq_factor, original context), None when unscaled."""
        if self.rope_factor == 1.0:
            return None
        return (
            self.rope_factor,
            self.rope_low_freq_factor,
            self.rope_high_freq_factor,
            self.rope_original_context,
        )

    @property
    def mlp_hidden(self) -> int:
        """The MLP's inner width: ``hidden_dim``, else 4·d, or for SwiGLU about 8/3·d."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        if self.mlp != "swiglu":
            return 4 * self.n_embd
        # three matrices of 8/3·d hold about the parameters of two of 4·d; rounded to a multiple of 64
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
# The Llama family's shapes, as their config.json files give them (init_from reads the same from the checkpoint).
_LLAMA = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
PRESETS |= {
    # cpu-medium's size in the family's shape (GQA 6:2, MLP widened to keep ≈ 12M parameters): −0.05 val bits per
    # byte at the same pretraining time, but not the default (BENCHMARKS.md, "The Llama family's shape as default?")
    "cpu-medium-llama": GPTConfig(
        **_LLAMA,
        vocab_size=8192,
        context_length=256,
        n_embd=384,
        n_head=6,
        n_kv_head=2,
        n_layer=6,
        hidden_dim=1152,
    ),
    "smollm2-135m": GPTConfig(
        **_LLAMA,
        vocab_size=49152,
        context_length=8192,
        n_embd=576,
        n_head=9,
        n_kv_head=3,
        n_layer=30,
        hidden_dim=1536,
        rope_base=100000.0,
    ),
    "llama3.2-1b": GPTConfig(
        **_LLAMA,
        vocab_size=128256,
        context_length=131072,
        n_embd=2048,
        n_head=32,
        n_kv_head=8,
        n_layer=16,
        hidden_dim=8192,
        rope_base=500000.0,
        rope_factor=32.0,
    ),
    "qwen3-0.6b": GPTConfig(
        **_LLAMA,
        vocab_size=151936,
        context_length=40960,
        n_embd=1024,
        n_head=16,
        n_kv_head=8,
        head_size=128,
        n_layer=28,
        hidden_dim=3072,
        rope_base=1000000.0,
        norm_eps=1e-6,
        qk_norm=True,
    ),
}


def config_from_preset(preset: str, **overrides) -> GPTConfig:
    """A preset with some fields replaced (``None`` overrides are ignored)."""
    if preset not in PRESETS:
        raise ModelConfigError(f"unknown model preset '{preset}' (known: {', '.join(PRESETS)})")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def make_norm(cfg: GPTConfig, size: int) -> nn.Module:
    """The model's norm over the last ``size`` features: GPT-2's LayerNorm or RMSNorm (eps ``norm_eps``)."""
    return (
        nn.RMSNorm(size, eps=cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(size, eps=cfg.norm_eps)
    )


def llama3_frequencies(inv_freq: torch.Tensor, scaling: tuple[float, float, float, int]) -> torch.Tensor:
    """Llama 3's rescaled rotation frequencies: slow ones (wavelength beyond original / low) divided by the factor,
    fast ones (below original / high) kept, the band between blended linearly in original / wavelength."""
    factor, low, high, original = scaling
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0: slow end, 1: fast end
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_angles(
    start: int | torch.Tensor,
    length: int,
    head_dim: int,
    base: float,
    device: torch.device,
    scaling: tuple[float, float, float, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (length, 1, head_dim / 2), of positions start..start+length-1 (``scaling``: Llama 3's)."""
    # Computed on every call, not stored: a model built on the meta device or loaded from a file needs no buffer.
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    )  # (head_dim/2,)
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, scaling)
    positions = (start + torch.arange(length, device=device)).float()
    angles = (positions[:, None] * inv_freq[None, :]).unsqueeze(
        1
    )  # (length, 1, head_dim/2): broadcasts over heads
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + head_dim/2]) of ``x`` (B, T, H, head_dim) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)  # the two halves, not interleaved pairs: x[i] turns with x[i + head_dim/2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # the angles are fp32; the result keeps x's dtype
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class MultiHeadAttention(nn.Module):
    """Causal self-attention through ``scaled_dot_product_attention`` (flash/memory-efficient kernels)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        # q of every head, then k and v of every key/value head, in one matmul
        self.sizes = (cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim)
        self.qkv = nn.Linear(cfg.n_embd, sum(self.sizes), bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout  # a probability: SDPA applies it to the attention weights
        self.rope_base = (
            cfg.rope_base if cfg.pos_emb == "rope" else None
        )  # None: learned positions, no rotation
        self.rope_scaling = cfg.rope_scaling
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)

    def project(
        self, x: torch.Tensor, start: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q as (B, T, n_head, head_dim), k and v as (B, T, n_kv_head, head_dim), for tokens at positions start..:
        q and k normalised (qk_norm), then rotated (rope). The ONNX export calls this too, so both compute the
        same heads."""
        b, t, _ = x.shape  # batch, sequence length, n_embd
        q, k, v = self.qkv(x).split(self.sizes, dim=2)
        q = q.view(b, t, self.n_head, self.head_dim)  # (B, T, nh, hs)
        k, v = (z.view(b, t, self.n_kv_head, self.head_dim) for z in (k, v))  # (B, T, n_kv, hs)
        if self.qk_norm:  # in fp32: RMSNorm's fused kernel wants input and weight in one dtype
            q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        if self.rope_base is not None:
            cos, sin = rope_angles(start, t, self.head_dim, self.rope_base, x.device, self.rope_scaling)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, _ = x.shape
        # The new tokens' positions continue after the cached ones; heads move forward to be a batch dim.
        q, k, v = (
            z.transpose(1, 2) for z in self.project(x, 0 if past is None else past[0].shape[2])
        )  # (B, nh, T, hs); k and v (B, n_kv, T, hs)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # (B, n_kv, T_past + T, hs)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)  # the cache keeps n_kv heads: grouped-query attention's saving
        if self.n_kv_head != self.n_head:  # each key/value head serves n_head / n_kv consecutive query heads
            groups = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        dropout = self.dropout if self.training else 0.0
        if past is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif t == 1:  # one new token may see every cached key: no mask
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            # is_causal would align the mask top-left; here the new queries sit at the end of the sequence:
            # query i may see keys up to past_len + i.
            past_len = k.shape[2] - t
            rows = torch.arange(t, device=x.device).unsqueeze(1) + past_len
            mask = (
                torch.arange(k.shape[2], device=x.device).unsqueeze(0) <= rows
            )  # (T, T_past + T), True = may attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(b, t, -1)  # the heads side by side: (B, T, n_head·hs)
        return self.out_proj(y), present  # this layer's cache, past and new keys together


class FeedForward(nn.Module):
    """GPT-2's GELU MLP (``fc`` up, ``proj`` down), ReLU² on the same widths, or SwiGLU (a ``gate`` beside ``fc``)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        if cfg.mlp == "swiglu":
            self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.proj(F.silu(self.gate(x)) * self.fc(x))
        if self.kind == "relu2":
            return self.proj(F.relu(self.fc(x)).square())
        return self.proj(
            F.gelu(self.fc(x), approximate="tanh")
        )  # GPT-2's tanh approximation (the book's GELU)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.n_embd)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = make_norm(cfg, cfg.n_embd)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)  # the book's drop_shortcut

    def forward(self, x, past=None):
        a, present = self.att(self.norm1(x), past)
        x = x + self.drop(a)  # shortcut connection around attention
        x = x + self.drop(self.ff(self.norm2(x)))  # and around the feed-forward
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
            self.out_head.weight = (
                self.tok_emb.weight
            )  # weight tying: one (vocab_size, n_embd) matrix in and out
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled down so the residual stream's variance does not grow with depth
        # (two residual additions per block, hence 2 * n_layer).
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
        """The residual stream's start, (B, T, n_embd), for tokens at positions start..: token embeddings plus,
        with learned positions, their rows of the position table."""
        x = self.tok_emb(idx)
        if self.pos_emb is not None:  # rope adds positions in attention instead
            x = x + self.pos_emb(
                start + torch.arange(idx.shape[1], device=idx.device)
            )  # (T, C) broadcasts over B
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
        start = (
            0 if past is None else past[0][0].shape[2]
        )  # tokens already in the cache: the first new position
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
            x = x[:, -1:, :]  # (B, 1, C): a slice, not an index, keeps the time dim
        return self.out_head(x), present  # logits (B, T, vocab_size), or (B, T, n_classes) for a classifier

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matrices (dim ≥ 2), none on biases, norms and nothing twice."""
        params = {id(p): p for p in self.parameters() if p.requires_grad}.values()  # by id: a tensor once
        decay = [p for p in params if p.dim() >= 2]  # linear weights and embeddings (a tied head is tok_emb)
        no_decay = [p for p in params if p.dim() < 2]  # biases and norm gains
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


GPTModel = GPT


def last_token_logits(model: nn.Module, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, n_out): the head's output at each row's last real token of right-padded ``idx``."""
    logits, _ = model(idx)
    # The book's classifier reads the last token: under the causal mask it has seen the whole text and none of
    # the padding after it.
    return logits[torch.arange(idx.shape[0], device=idx.device), lengths - 1]


def flops_per_token(cfg: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6N + 12·L·d·T (PaLM appendix B; d: all query heads' width)."""
    # 6N: 2 per parameter forward, 4 backward; 12·L·d·T: attention's scores and weighted sum, which N does not count.
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
