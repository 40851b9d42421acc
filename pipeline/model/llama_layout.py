"""The Llama family's Hugging Face layout ↔ our GPT: parameter names, the split q/k/v and the config, both ways.

``LlamaForCausalLM`` (Llama 3.x, SmolLM2), ``Qwen2ForCausalLM`` and ``Qwen3ForCausalLM`` store ``model.embed_tokens``,
``model.layers.N.self_attn.{q,k,v,o}_proj`` (``nn.Linear``, k and v with ``n_kv_head·head_dim`` rows),
Qwen3's ``self_attn.{q,k}_norm``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``,
``model.norm`` and ``lm_head`` (absent when tied). Our attention holds q, k and v as one matrix, their rows
stacked; transformers' ``rotate_half`` pairs dimension i with i + head_dim/2, as our ``apply_rope`` does, so
no row is permuted here. Biases the checkpoint lacks but our shape has are zeros (they compute the same).

What the file formats cannot say (a learned position table, LayerNorm, a GELU MLP) is refused in one line by
``require_llama``; which checkpoint files to read (one or sharded) is the loader's business (model/gpt2_weights.py).
"""

from __future__ import annotations

import torch

from pipeline.common.errors import PipelineError
from pipeline.model.gpt import GPTConfig

MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
PREFIX = "model."
HEAD = "lm_head.weight"
# (Hugging Face name in a layer, our name in a block) of the tensors every layer has.
_LAYER = (
    ("input_layernorm.weight", "norm1.weight"),
    ("post_attention_layernorm.weight", "norm2.weight"),
    ("mlp.gate_proj.weight", "ff.gate.weight"),
    ("mlp.up_proj.weight", "ff.fc.weight"),
    ("mlp.down_proj.weight", "ff.proj.weight"),
)
_MLP_BIASES = (
    ("mlp.gate_proj.bias", "ff.gate.bias"),
    ("mlp.up_proj.bias", "ff.fc.bias"),
    ("mlp.down_proj.bias", "ff.proj.bias"),
)
_QK_NORM = (
    ("self_attn.q_norm.weight", "att.q_norm.weight"),
    ("self_attn.k_norm.weight", "att.k_norm.weight"),
)
# What our GPT must compute to be a Llama-family model (field → (required value, what a refusal names)).
_LLAMA_SHAPE = {
    "pos_emb": ("rope", "a learned position table"),
    "norm": ("rmsnorm", "LayerNorm"),
    "mlp": ("swiglu", "a non-gated MLP"),
}


def architecture(cfg: GPTConfig) -> str:
    """The transformers model type our shape exports as: qwen3 with q/k norms, llama without."""
    return "qwen3" if cfg.qk_norm else "llama"


def require_llama(cfg: GPTConfig, fmt: str, formats_key: str) -> None:
    """Refuse, in one line, a model that no Llama-family file (``fmt``) can hold."""
    for name, (value, what) in _LLAMA_SHAPE.items():
        if getattr(cfg, name) != value:
            raise PipelineError(
                f"model.{name}={getattr(cfg, name)}: {fmt} cannot hold {what}; the Llama family needs "
                f"pos_emb: rope, norm: rmsnorm, mlp: swiglu (or drop {formats_key} from export.formats)"
            )
    if cfg.qk_norm and cfg.bias:
        raise PipelineError(
            f"model.bias=true: {fmt} cannot hold Qwen3's (qk_norm) out_proj or MLP biases; train with "
            f"bias: false (or drop {formats_key} from export.formats)"
        )


def _rope(hf: dict) -> tuple[float, dict]:
    """(rope_theta, rope scaling or {}) from either transformers layout: ``rope_theta`` + ``rope_scaling``
    (config.json on the Hub) or ``rope_parameters`` (transformers 5)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta), scaling


def config_from_hf(hf: dict, origin: str) -> dict:
    """The GPTConfig fields a Llama / Qwen2 / Qwen3 ``config.json`` describes; refuses what our GPT cannot compute."""
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise PipelineError(f"{origin}: model_type {kind!r} is not one of {', '.join(MODEL_TYPES)}")
    missing = [k for k in REQUIRED if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool)]
    if missing:
        raise PipelineError(f"{origin}: not a {kind} config (no integer {', '.join(missing)})")
    theta, scaling = _rope(hf)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), ("silu",)),
        "rope_scaling": (rope_type, ("default", "llama3")),
        "use_sliding_window": (hf.get("use_sliding_window", False), (False,)),
        "pretraining_tp": (hf.get("pretraining_tp", 1), (1,)),
    }
    for key, (value, accepted) in unsupported.items():
        if value not in accepted:
            raise PipelineError(
                f"{origin}: {key}={value!r} is not supported (our GPT computes {accepted[0]!r})"
            )
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or n_head
    head_size = hf.get("head_dim") or n_embd // n_head
    attention_bias = bool(hf.get("attention_bias", False))
    fields = {
        "vocab_size": hf["vocab_size"],
        "context_length": hf.get("max_position_embeddings", 2048),
        "n_embd": n_embd,
        "n_head": n_head,
        "n_layer": hf["num_hidden_layers"],
        "dropout": float(hf.get("attention_dropout", 0.0)),
        "qkv_bias": attention_bias or kind == "qwen2",  # Qwen2: q, k, v biases, none in o_proj
        "tie_weights": bool(hf.get("tie_word_embeddings", False)),
        "pos_emb": "rope",
        "rope_base": theta,
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "qk_norm": kind == "qwen3",
        "n_kv_head": None if n_kv == n_head else n_kv,
        "head_size": None if head_size * n_head == n_embd else head_size,
        "hidden_dim": hf["intermediate_size"],
        "bias": attention_bias or bool(hf.get("mlp_bias", False)),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    }
    if rope_type == "llama3":
        fields |= {
            "rope_factor": float(scaling["factor"]),
            "rope_low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
            "rope_high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
            "rope_original_context": int(scaling.get("original_max_position_embeddings", 8192)),
        }
    return fields


def config_to_hf(cfg: GPTConfig, bos_id: int, eos_id: int, **extra: object) -> dict:
    """A ``LlamaConfig`` / ``Qwen3Config`` as a dict (``config.json``) for our Llama-shaped ``cfg``."""
    kind = architecture(cfg)
    hf = {
        "model_type": kind,
        "architectures": [MODEL_TYPES[kind]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "rope_scaling": None,
        "attention_bias": cfg.qkv_bias or cfg.bias,  # q, k, v and o together: a missing one written as zeros
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "use_cache": True,
        **extra,
    }
    if kind == "llama":
        hf["mlp_bias"] = cfg.bias
    if cfg.rope_scaling is not None:
        factor, low, high, original = cfg.rope_scaling
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": original,
        }
    return hf


def _layer_names(cfg: GPTConfig) -> list[tuple[str, str]]:
    """(their name, our name) of one layer's tensors other than q/k/v and o (which are split or optional)."""
    names = list(_LAYER)
    if cfg.bias:
        names += _MLP_BIASES
    if cfg.qk_norm:
        names += _QK_NORM
    return names


def from_hf(state: dict[str, torch.Tensor], cfg: GPTConfig, origin: str) -> dict[str, torch.Tensor]:
    """A Llama-family state dict → ours for ``cfg`` (vocabulary rows as stored; missing biases as zeros)."""
    attn = cfg.n_head * cfg.head_dim

    used = {HEAD}  # the names read; a tied checkpoint may still carry lm_head.weight, a copy of embed_tokens

    def take(name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name in state:
            used.add(name)
            return state[name]
        if shape is None:
            raise PipelineError(f"{origin}: not a complete {cfg.n_layer}-layer checkpoint (missing {name})")
        return torch.zeros(shape)  # a bias our shape has and this checkpoint lacks: zero computes the same

    ours = {
        "tok_emb.weight": take(PREFIX + "embed_tokens.weight"),
        "final_norm.weight": take(PREFIX + "norm.weight"),
    }
    for i in range(cfg.n_layer):
        theirs, mine = f"{PREFIX}layers.{i}.", f"blocks.{i}."
        for their_name, our_name in _layer_names(cfg):
            optional = (
                (cfg.n_embd if their_name.startswith("mlp.down") else cfg.mlp_hidden,)
                if ".bias" in their_name
                else None
            )
            ours[mine + our_name] = take(theirs + their_name, optional)
        qkv = [f"{theirs}self_attn.{p}_proj" for p in "qkv"]
        ours[mine + "att.qkv.weight"] = torch.cat([take(name + ".weight") for name in qkv])
        if cfg.qkv_bias:
            ours[mine + "att.qkv.bias"] = torch.cat(
                [take(name + ".bias", (rows,)) for name, rows in zip(qkv, _qkv_rows(cfg), strict=True)]
            )
        ours[mine + "att.out_proj.weight"] = take(theirs + "self_attn.o_proj.weight")
        if cfg.bias:
            ours[mine + "att.out_proj.bias"] = take(theirs + "self_attn.o_proj.bias", (cfg.n_embd,))
    if not cfg.tie_weights:
        ours["out_head.weight"] = take(HEAD)
    unexpected = sorted(
        set(state) - used
    )  # e.g. a bias config.json does not announce: never dropped silently
    if unexpected:
        raise PipelineError(f"{origin}: unexpected tensors for a {cfg.n_layer}-layer model: {unexpected[:3]}")
    if ours["blocks.0.att.qkv.weight"].shape != (attn + 2 * cfg.kv_heads * cfg.head_dim, cfg.n_embd):
        raise PipelineError(
            f"{origin}: q/k/v projections of shape {tuple(ours['blocks.0.att.qkv.weight'].shape)} do not match "
            f"config.json's heads ({cfg.n_head} query, {cfg.kv_heads} key/value, head_dim {cfg.head_dim})"
        )
    return {name: tensor.to(torch.float32).contiguous() for name, tensor in ours.items()}


def _qkv_rows(cfg: GPTConfig) -> tuple[int, int, int]:
    return (cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim)


def to_hf(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict → ``save_pretrained``'s layout for ``config_to_hf(cfg)`` (a tied head stored once)."""
    out = {
        PREFIX + "embed_tokens.weight": state["tok_emb.weight"],
        PREFIX + "norm.weight": state["final_norm.weight"],
    }
    bias = cfg.qkv_bias or cfg.bias  # attention_bias: q, k, v and o all have one
    for i in range(cfg.n_layer):
        theirs, mine = f"{PREFIX}layers.{i}.", f"blocks.{i}."
        for their_name, our_name in _layer_names(cfg):
            out[theirs + their_name] = state[mine + our_name]
        rows = _qkv_rows(cfg)
        for p, w in zip("qkv", state[mine + "att.qkv.weight"].split(rows), strict=True):
            out[f"{theirs}self_attn.{p}_proj.weight"] = w
        if bias:
            qkv_bias = state.get(mine + "att.qkv.bias", torch.zeros(sum(rows)))
            for p, b in zip("qkv", qkv_bias.split(rows), strict=True):
                out[f"{theirs}self_attn.{p}_proj.bias"] = b
            out[theirs + "self_attn.o_proj.bias"] = state.get(
                mine + "att.out_proj.bias", torch.zeros(cfg.n_embd)
            )
        out[theirs + "self_attn.o_proj.weight"] = state[mine + "att.out_proj.weight"]
    if not cfg.tie_weights:
        out[HEAD] = state["out_head.weight"]
    return {
        name: tensor.detach().contiguous() for name, tensor in out.items()
    }  # (the export holds a CPU model)
