"""GPT-2's Hugging Face layout ↔ our GPT: parameter names, Conv1D transposes and the config, both directions.

Hugging Face's ``GPT2LMHeadModel`` stores ``c_attn``, ``c_proj`` and ``c_fc`` as Conv1D (``y = x @ W + b``), so
their matrices are the transpose of our ``nn.Linear`` ones. Checkpoints come in two key layouts: what
``save_pretrained`` writes (``transformer.h.0...`` and, untied, ``lm_head.weight``) and the Hub's original files
(``h.0...`` without the prefix; the ``.bin`` files also carry the ``attn.bias`` / ``attn.masked_bias`` causal-mask
buffers, which are not weights). Both read the same; we write the ``save_pretrained`` layout.
"""

from __future__ import annotations

import torch

from pipeline.common.errors import PipelineError
from pipeline.model.gpt import CHOICES, GPTConfig

PREFIX = "transformer."
HEAD = "lm_head.weight"
# Buffers of older GPT-2 files: the causal mask and its fill value, not parameters.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
# GELU with the tanh approximation is what both names compute (our FeedForward's approximate="tanh").
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")

# (GPT-2 name, our name, Conv1D matrix?) per block.
_BLOCK = (
    ("ln_1.weight", "norm1.weight", False),
    ("ln_1.bias", "norm1.bias", False),
    ("attn.c_attn.weight", "att.qkv.weight", True),
    ("attn.c_attn.bias", "att.qkv.bias", False),
    ("attn.c_proj.weight", "att.out_proj.weight", True),
    ("attn.c_proj.bias", "att.out_proj.bias", False),
    ("ln_2.weight", "norm2.weight", False),
    ("ln_2.bias", "norm2.bias", False),
    ("mlp.c_fc.weight", "ff.fc.weight", True),
    ("mlp.c_fc.bias", "ff.fc.bias", False),
    ("mlp.c_proj.weight", "ff.proj.weight", True),
    ("mlp.c_proj.bias", "ff.proj.bias", False),
)
_TOP = (
    ("wte.weight", "tok_emb.weight"),
    ("wpe.weight", "pos_emb.weight"),
    ("ln_f.weight", "final_norm.weight"),
    ("ln_f.bias", "final_norm.bias"),
)
# What each architecture option beyond GPT-2 computes (GPTConfig field → value → its name in a refusal).
_NOT_GPT2 = {
    "pos_emb": {"rope": "rotary position embeddings"},
    "norm": {"rmsnorm": "RMSNorm"},
    "mlp": {"relu2": "a ReLU² MLP", "swiglu": "a SwiGLU MLP"},
    "qk_norm": {True: "query/key normalisation"},
}
_GPT2_VALUES = {name: values[0] for name, values in CHOICES.items()} | {"qk_norm": "false"}


def require_gpt2(cfg: GPTConfig, fmt: str, formats_key: str) -> None:
    """Refuse, in one line, a model whose architecture options a GPT-2 file format (``fmt``) cannot hold."""
    for name, names in _NOT_GPT2.items():
        value = getattr(cfg, name)
        if value in names:
            shown = str(value).lower() if isinstance(value, bool) else value
            raise PipelineError(
                f"model.{name}={shown}: {fmt} cannot hold {names[value]}; export a model trained "
                f"with {name}: {_GPT2_VALUES[name]} (or drop {formats_key} from export.formats)"
            )
    shapes = {  # the Llama family's attention shapes, with what GPT-2's one c_attn matrix computes instead
        "n_kv_head": (cfg.kv_heads, cfg.n_head, "grouped-query attention"),
        "head_size": (cfg.head_dim, cfg.n_embd // cfg.n_head, "heads of another width than n_embd / n_head"),
    }
    for name, (value, gpt2, what) in shapes.items():
        if value != gpt2:
            raise PipelineError(
                f"model.{name}={value}: {fmt} cannot hold {what} (or drop {formats_key} from export.formats)"
            )


def normalize_keys(state: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """Either key layout → GPT-2 names without the ``transformer.`` prefix (``lm_head.weight`` kept), buffers dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if name.endswith(MASK_BUFFERS):
            continue
        if name in out:
            raise PipelineError(
                f"{origin}: tensor {name} appears twice (with and without the '{PREFIX}' prefix)"
            )
        out[name] = tensor
    return out


def config_from_hf(hf: dict, origin: str) -> dict:
    """The GPTConfig fields a GPT-2 ``config.json`` describes (vocab included); refuses what our GPT cannot compute."""
    if hf.get("model_type") != "gpt2":
        raise PipelineError(
            f"{origin}: model_type {hf.get('model_type')!r} is not a GPT-2 checkpoint (model_type 'gpt2')"
        )
    n_embd = hf.get("n_embd", 768)
    # (value, what our GPT computes): a checkpoint with anything else would load, but compute another function
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), GELU_TANH),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "add_cross_attention": (hf.get("add_cross_attention", False), (False,)),
    }
    for key, (value, accepted) in unsupported.items():
        if value not in accepted:
            raise PipelineError(
                f"{origin}: {key}={value!r} is not supported (our GPT computes {accepted[0]!r})"
            )
    ours = hf.get("llm_pipeline", {}).get("model", {})  # what our own exports add to config.json
    return {
        "vocab_size": hf.get("vocab_size", 50257),
        "context_length": hf.get("n_positions", 1024),
        "n_embd": n_embd,
        "n_head": hf.get("n_head", 12),
        "n_layer": hf.get("n_layer", 12),
        "dropout": hf.get("resid_pdrop", 0.1),
        # GPT-2 always has a qkv bias; our exports of bias-free models write zeros and say so.
        "qkv_bias": ours.get("qkv_bias", True),
        "bias": ours.get("bias", True),
        "tie_weights": hf.get("tie_word_embeddings", True),
        "hidden_dim": None if hf.get("n_inner") in (None, 4 * n_embd) else hf["n_inner"],
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
    }


def from_gpt2(state: dict[str, torch.Tensor], cfg: GPTConfig, origin: str) -> dict[str, torch.Tensor]:
    """GPT-2-named tensors (``normalize_keys`` output) → our state dict for ``cfg`` (vocabulary rows as stored)."""
    expected = [name for name, _ in _TOP]
    expected += [f"h.{i}.{name}" for i in range(cfg.n_layer) for name, _, _ in _BLOCK]
    if not cfg.tie_weights:
        expected.append(HEAD)
    missing = [name for name in expected if name not in state]
    if missing:
        raise PipelineError(
            f"{origin}: not a complete GPT-2 checkpoint of {cfg.n_layer} layers (missing {missing[:3]})"
        )
    # a tied checkpoint may still carry lm_head.weight, a copy of wte
    unexpected = sorted(set(state) - set(expected) - ({HEAD} if cfg.tie_weights else set()))
    if unexpected:
        raise PipelineError(f"{origin}: unexpected tensors for a {cfg.n_layer}-layer GPT-2: {unexpected[:3]}")
    ours = {mine: state[theirs] for theirs, mine in _TOP}
    for i in range(cfg.n_layer):
        for theirs, mine, conv1d in _BLOCK:
            tensor = state[f"h.{i}.{theirs}"]
            # a bias our shape lacks was written as zeros (qkv_bias / bias false)
            flag = "qkv_bias" if mine == "att.qkv.bias" else "bias"
            if mine.endswith(".bias") and not mine.startswith("norm") and not getattr(cfg, flag):
                if torch.count_nonzero(tensor):
                    raise PipelineError(
                        f"{origin}: h.{i}.{theirs} is not zero but the config says {flag} false"
                    )
                continue
            ours[f"blocks.{i}.{mine}"] = (
                tensor.t() if conv1d else tensor
            )  # Conv1D's (in, out) → nn.Linear's (out, in)
    if not cfg.tie_weights:
        ours["out_head.weight"] = state[HEAD]
    return {
        name: tensor.to(torch.float32).contiguous() for name, tensor in ours.items()
    }  # fp32, whatever the file held


def to_gpt2(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict → ``save_pretrained``'s layout (``transformer.`` prefix; the tied head stored once, as wte)."""
    out = {PREFIX + theirs: state[mine] for theirs, mine in _TOP}
    for i in range(cfg.n_layer):
        for theirs, mine, conv1d in _BLOCK:
            name = f"blocks.{i}.{mine}"
            # GPT-2's layout always has biases: zeros compute the same
            if mine.endswith(".bias") and name not in state:
                tensor = torch.zeros(state[name.replace(".bias", ".weight")].shape[0])
            else:
                tensor = state[name].t() if conv1d else state[name]
            out[f"{PREFIX}h.{i}.{theirs}"] = tensor
    if not cfg.tie_weights:
        out[HEAD] = state["out_head.weight"]
    return {name: tensor.detach().cpu().contiguous() for name, tensor in out.items()}


def config_to_hf(cfg: GPTConfig, eos_id: int, **extra: object) -> dict:
    """A ``GPT2Config`` as a dict (what transformers' ``config.json`` holds) for our shape."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "n_layer": cfg.n_layer,
        "n_inner": None if cfg.hidden_dim is None else cfg.mlp_hidden,
        "activation_function": "gelu_new",  # the tanh GELU, as our FeedForward computes
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": eos_id,  # GPT-2 uses <|endoftext|> for both
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        **extra,
    }
