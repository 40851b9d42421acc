"""``model.init_from``: start from a checkpoint (a Hugging Face Hub name or repo id, or local files) of GPT-2
(``GPT2LMHeadModel``) or the Llama family (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``).

Checkpoints are fetched with ``huggingface_hub`` (GPT-2's names at a pinned revision, a repo id at
``model.revision`` or ``main``; its cache, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and progress bars apply), and
only when a stage asks: nothing touches the network at import. The config is read first, so a shape that
disagrees with ``model.*`` or a model that cannot fit in memory is refused before gigabytes are downloaded.
Weights load from safetensors (one file, or shards listed in ``model.safetensors.index.json``), or from a
``.bin`` with ``torch.load(weights_only=True)`` (never pickled code). Which names mean what is the layout
modules' business (model/gpt2_layout.py, model/llama_layout.py).

Vocabulary: OpenAI's GPT-2 has 50,257 tokens; our ``gpt2`` tokenizer kind has the same ids plus 15 special tokens
(chat markers, reserved), whose new embedding rows start as the mean of GPT-2's rows. A checkpoint we exported
ourselves (``models/hf``) records our tokenizer's fingerprint and must meet the same tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.common.errors import PipelineError
from pipeline.model import gpt2_layout, llama_layout
from pipeline.model.checkpoint import read_weights_file
from pipeline.model.gpt import GPT, GPTConfig, ModelConfigError
from pipeline.model.gpt2_layout import HEAD, from_gpt2, normalize_keys

SCRATCH = "scratch"
# OpenAI's GPT-2 sizes on the Hub, at revisions seen in public Hugging Face caches (override with model.revision).
NAMED: dict[str, tuple[str, str]] = {
    "gpt2": ("openai-community/gpt2", "607a30d783dfa663caf39e06633721c8d4cfcd7e"),
    "gpt2-medium": ("openai-community/gpt2-medium", "6dcaa7a952f72f9298047fd5137cd6e4f05f41da"),
    "gpt2-large": ("openai-community/gpt2-large", "32b71b12589c2f8d625668d2335a01cac3249519"),
    "gpt2-xl": ("openai-community/gpt2-xl", "15ea56dee5df4983c59b2538573817e1667135e2"),
}
HF_CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"  # sharded checkpoints: tensor name → shard file
PICKLE_BIN = "pytorch_model.bin"
GPT2_VOCAB = 50257
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hub spells repositories
SHAPE_FIELDS = (
    "context_length",
    "n_embd",
    "n_head",
    "n_layer",
    "qkv_bias",
    "tie_weights",
    "pos_emb",
    "rope_base",
    "norm",
    "mlp",
    "qk_norm",
    "n_kv_head",
    "head_size",
    "hidden_dim",
    "bias",
    "norm_eps",
)


@dataclass
class Source:
    """Where a checkpoint comes from: its config, and how to get its weights (a local file or a Hub fetch)."""

    label: str  # what the user wrote in model.init_from
    hf_config: dict
    config_path: Path
    provenance: dict
    weights_path: Path | None = None  # the one file, or the shard index
    repo: str | None = None
    revision: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # file name → sha256, filled when read


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: not a JSON object")
    return data


def _local_source(init_from: str) -> Source:
    path = Path(init_from).expanduser()
    if path.is_dir():
        directory, weights = (
            path,
            next((path / n for n in (SAFETENSORS, SHARD_INDEX, PICKLE_BIN) if (path / n).is_file()), None),
        )
        if weights is None:
            raise PipelineError(
                f"model.init_from={init_from}: no {SAFETENSORS}, {SHARD_INDEX} or {PICKLE_BIN} in that directory"
            )
    else:
        directory, weights = path.parent, path
    config_path = directory / HF_CONFIG
    if not config_path.is_file():
        raise PipelineError(
            f"model.init_from={init_from}: {config_path} not found (a config.json must sit beside the weights)"
        )
    return Source(
        init_from, _read_json(config_path), config_path, {"path": str(path.resolve())}, weights_path=weights
    )


def _hub_download(repo: str, filename: str, revision: str, label: str) -> Path:
    """One file through huggingface_hub (cache, HF_HUB_OFFLINE, HF_ENDPOINT); failures become one line."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except LocalEntryNotFoundError as exc:  # (a subclass of EntryNotFoundError: caught first)
        raise PipelineError(
            f"model.init_from={label}: {repo}@{revision[:12]} {filename} is not in the Hugging Face cache and the Hub "
            f"cannot be reached ({_first_line(exc)}); connect once or pre-fill the cache (HF_HOME)"
        ) from None
    except RevisionNotFoundError:
        raise PipelineError(f"model.revision={revision}: no such revision of {repo} on the Hub") from None
    except RepositoryNotFoundError:
        raise PipelineError(f"model.init_from={label}: repository {repo} not found on the Hub") from None
    except EntryNotFoundError:
        raise  # the caller tries the next weights file
    except (HfHubHTTPError, OSError) as exc:
        raise PipelineError(
            f"model.init_from={label}: downloading {repo} {filename} failed ({_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _hub_source(name: str, revision: str | None) -> Source:
    repo, pinned = NAMED.get(name, (name, "main"))  # a repo id: its main branch unless model.revision says
    revision = revision or pinned
    config_path = _hub_download(repo, HF_CONFIG, revision, name)
    # The cache stores files under snapshots/<commit>/: the commit a branch or tag resolved to.
    provenance = {"repo": repo, "revision": revision, "commit": config_path.parent.name}
    return Source(name, _read_json(config_path), config_path, provenance, repo=repo, revision=revision)


def resolve(init_from: str, revision: str | None = None) -> Source:
    """The checkpoint ``model.init_from`` names; reads only its config (the weights come later, after the checks)."""
    if init_from in NAMED:
        return _hub_source(init_from, revision)
    if Path(init_from).expanduser().exists():
        return _local_source(init_from)
    if REPO_ID.fullmatch(init_from):
        return _hub_source(init_from, revision)
    known = ", ".join([SCRATCH, *NAMED])
    raise PipelineError(
        f"model.init_from={init_from!r} is neither a known checkpoint ({known}), a Hub repo id (owner/name) "
        "nor an existing file or directory"
    )


def weights_path(source: Source) -> Path:
    """The weights file, downloading it for a Hub source (safetensors preferred, else the pickle-free .bin)."""
    if source.weights_path is not None:
        return source.weights_path
    from huggingface_hub.errors import EntryNotFoundError

    for filename in (SAFETENSORS, SHARD_INDEX, PICKLE_BIN):
        try:
            source.weights_path = _hub_download(source.repo, filename, source.revision, source.label)
        except EntryNotFoundError:
            continue
        if filename == SHARD_INDEX:  # the shards themselves, beside the index in the cache
            for shard in sorted(set(_shard_map(source.weights_path).values())):
                _hub_download(source.repo, shard, source.revision, source.label)
        return source.weights_path
    raise PipelineError(
        f"model.init_from={source.label}: {source.repo} has none of {SAFETENSORS}, {SHARD_INDEX}, {PICKLE_BIN}"
    )


def _shard_map(index: Path) -> dict[str, str]:
    """A shard index's tensor name → shard file name (plain names: a shard never lies outside the directory)."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(f, str) and f == Path(f).name and f.endswith(".safetensors") for f in weight_map.values()
    ):
        raise PipelineError(
            f"{index}: no weight_map of tensor → .safetensors file names in the same directory"
        )
    return weight_map


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(every tensor, file name → sha256) of one weights file or of the shards an index lists."""
    if path.name != SHARD_INDEX:
        return read_weights_file(path), {path.name: _sha256(path)}
    state: dict[str, torch.Tensor] = {}
    files = {}
    for shard in sorted(set(_shard_map(path).values())):
        shard_path = path.parent / shard
        if not shard_path.is_file():
            raise PipelineError(f"{path}: lists {shard}, which is not in {path.parent}")
        state |= read_weights_file(shard_path)
        files[shard] = _sha256(shard_path)
    return state, files


def family(hf_config: dict) -> str:
    """gpt2 or llama: which layout a config.json's model_type reads with."""
    return "llama" if hf_config.get("model_type") in llama_layout.MODEL_TYPES else "gpt2"


def config_from_hf(source: Source) -> dict:
    if family(source.hf_config) == "llama":
        return llama_layout.config_from_hf(source.hf_config, str(source.config_path))
    return gpt2_layout.config_from_hf(source.hf_config, str(source.config_path))


def checkpoint_config(source: Source, n_vocab: int, tokenizer: dict, dropout: float | None) -> GPTConfig:
    """Our GPTConfig for the checkpoint, with the tokenizer's vocabulary; refuses a tokenizer with other ids."""
    fields = config_from_hf(source)
    ours = source.hf_config.get("llm_pipeline", {}).get("tokenizer", {}).get("fingerprint")
    stored = fields["vocab_size"]
    if ours is not None:
        if ours != tokenizer.get("fingerprint"):
            raise PipelineError(
                f"model.init_from={source.label}: exported with tokenizer {ours[:12]}, but data/tokenizer is "
                f"{str(tokenizer.get('fingerprint'))[:12]} (same tokenizer params needed)"
            )
    elif family(source.hf_config) == "llama":
        _check_own_tokenizer(source, tokenizer)
        n_vocab = max(
            stored, n_vocab
        )  # rows the tokenizer leaves unused stay; our appended specials get rows
    elif tokenizer.get("kind") != "gpt2":
        raise PipelineError(
            f"model.init_from={source.label} needs tokenizer.kind: gpt2 (GPT-2's token ids), got {tokenizer.get('kind')!r}"
        )
    elif stored not in (GPT2_VOCAB, n_vocab):
        raise PipelineError(
            f"model.init_from={source.label}: vocab_size {stored} is not GPT-2's {GPT2_VOCAB} tokens, so its ids are not "
            f"those of tokenizer.kind gpt2 ({n_vocab} tokens)"
        )
    if stored > n_vocab:
        raise PipelineError(
            f"model.init_from={source.label}: vocab_size {stored} > the tokenizer's {n_vocab} tokens"
        )
    fields["vocab_size"] = n_vocab
    if dropout is not None:
        fields["dropout"] = dropout
    try:
        return GPTConfig(**fields)
    except ModelConfigError as exc:
        raise PipelineError(f"{source.config_path}: {exc}") from None


def _check_own_tokenizer(source: Source, tokenizer: dict) -> None:
    """A Llama-family base meets its own tokenizer.json (tokenizer.kind hf), the file beside its config.json."""
    beside = source.config_path.parent / "tokenizer.json"
    if tokenizer.get("kind") != "hf" or not beside.is_file():
        raise PipelineError(
            f"model.init_from={source.label}: a {source.hf_config['model_type']} base needs its own tokenizer: "
            f"set tokenizer.kind: hf and tokenizer.source: {source.label} (its tokenizer.json)"
        )
    if _sha256(beside) != tokenizer.get("tokenizer_json_sha256"):
        raise PipelineError(
            f"model.init_from={source.label}: data/tokenizer was made from another tokenizer.json than {beside} "
            f"(tokenizer.source {tokenizer.get('source')!r}); point tokenizer.source at the base"
        )


def check_shape(cfg: GPTConfig, explicit: dict[str, object], label: str, origin: str = "params.yaml") -> None:
    """Explicit model.* values must equal the checkpoint's (``explicit``: field → value, only those set)."""
    resolved = {
        "n_kv_head": "kv_heads",
        "head_size": "head_dim",
        "hidden_dim": "mlp_hidden",
    }  # None's meaning
    for name, value in explicit.items():
        actual = getattr(cfg, resolved.get(name, name))
        if value is not None and actual != value:
            raise PipelineError(
                f"{origin}: model.{name}={value} disagrees with model.init_from={label} ({name}={actual})"
            )


def load_weights(source: Source, cfg: GPTConfig) -> GPT:
    """Build our GPT for ``cfg`` from the checkpoint's weights (extra vocabulary rows: the mean of the stored ones)."""
    path = weights_path(source)
    state, source.files = read_checkpoint(path)
    stored = source.hf_config.get("vocab_size", GPT2_VOCAB)
    if family(source.hf_config) == "llama":
        shapes = {llama_layout.PREFIX + "embed_tokens.weight": (stored, cfg.n_embd)}
    else:
        state = normalize_keys(state, str(path))
        shapes = {"wte.weight": (stored, cfg.n_embd), "wpe.weight": (cfg.context_length, cfg.n_embd)}
    for name, shape in shapes.items():
        if name in state and tuple(state[name].shape) != shape:
            raise PipelineError(
                f"{path}: {name} has shape {tuple(state[name].shape)}, its config.json says {shape}"
            )
    if family(source.hf_config) == "llama":
        ours = llama_layout.from_hf(state, cfg, str(path))
    else:
        ours = from_gpt2(state, cfg, str(path))
    rows = ["tok_emb.weight"] + ([] if cfg.tie_weights else ["out_head.weight"])
    for name in rows:
        if ours[name].shape[0] < cfg.vocab_size:
            # The mean row: every new token starts as the "average" token, so its logit does not stand out before
            # training teaches it (Hewitt, 2021, "Initializing new word embeddings for pretrained language models").
            extra = ours[name].mean(dim=0, keepdim=True).expand(cfg.vocab_size - ours[name].shape[0], -1)
            ours[name] = torch.cat([ours[name], extra])
    if not cfg.tie_weights and HEAD not in state:  # (the Llama layout refused this already)
        raise PipelineError(f"{path}: untied head (tie_word_embeddings false) but no {HEAD}")
    if cfg.tie_weights:
        ours["out_head.weight"] = ours["tok_emb.weight"]
    with torch.device("meta"):
        model = GPT(cfg)  # no random init of weights that are about to be replaced
    model.load_state_dict(ours, assign=True)  # assign: meta parameters have no storage to copy into
    if cfg.tie_weights:
        model.out_head.weight = (
            model.tok_emb.weight
        )  # assign=True set two separate parameters: tie them again
    return model


def param_count(cfg: GPTConfig) -> int:
    """Parameters of ``GPT(cfg)`` (a tied head counted once), counted on the meta device: no memory allocated."""
    with torch.device("meta"):
        return GPT(cfg).num_params(non_embedding=False)


def training_bytes(cfg: GPTConfig, training: bool, batch_size: int, context: int) -> int:
    """Memory the run needs, roughly: fp32 weights and, to train, their gradients, AdamW's moments and activations."""
    n_params = param_count(cfg)
    if not training:
        return 4 * n_params  # fp32 weights: 4 B/param
    tokens = batch_size * context
    activations = tokens * (
        34 * cfg.n_embd * cfg.n_layer + 2 * 4 * cfg.vocab_size
    )  # ~34·d B per token and layer; fp32 logits twice
    return 16 * n_params + activations  # weights, gradients and AdamW's two moments: 4 B/param each


def available_bytes(device: torch.device) -> int:
    """Free memory of the device training will use: GPU memory, or the host's MemAvailable (Linux), else free pages."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/meminfo").read_text().splitlines()
        return int(next(line for line in lines if line.startswith("MemAvailable:")).split()[1]) * 1024  # kB
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(cfg: GPTConfig, label: str, needed: int, available: int, device: str, training: bool) -> None:
    """Refuse, before any weights are read, a run that cannot fit in ``available`` bytes."""
    if needed > available:
        what = (
            "continuing pretraining (weights, gradients, AdamW moments, activations)"
            if training
            else "its weights"
        )
        raise PipelineError(
            f"model.init_from={label}: {param_count(cfg) / 1e6:,.0f}M parameters need about {needed / 2**30:.1f} GiB "
            f"for {what}, but {device} has {available / 2**30:.1f} GiB free (lower pretrain.batch_size or use a smaller model)"
        )


def provenance(source: Source) -> dict:
    """What models/base records about its starting point: repo, revision, commit or path, and file hashes."""
    return {"init_from": source.label, **source.provenance, "files": dict(source.files)}
