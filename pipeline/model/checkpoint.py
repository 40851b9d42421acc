"""Model directories: safetensors weights + config.json, written atomically, loaded without pickle.

Every consumer (evaluate, sft, dpo, export, serve) loads through ``load_model`` / ``load_with_tokenizer`` here.

A model directory (``models/base``, ``models/sft``, ``models/dpo``) holds:
  model.safetensors  the weights (a tied head is stored once)
  config.json        {"model": GPTConfig fields, "sha256": {"model.safetensors": hex digest},
                     "tokenizer": {"path", "fingerprint"}, ...extra metadata}
or, for a LoRA run with ``lora.merge: false``, an adapter on top of another model directory:
  adapter.safetensors  the adapter tensors (and any layer trained in full)
  config.json          as above (its sha256 naming adapter.safetensors) plus {"adapter": {"base": "models/base",
                       "base_fingerprint", "rank", ...}}
``load_model`` applies such an adapter to its base and merges it, so every consumer gets a plain GPT.

Loading verifies the recorded sha256 of the weights and the types of config.json, so a damaged directory is
refused with one line naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.common.atomic import atomic_path
from pipeline.common.errors import PipelineError, one_line
from pipeline.common.hashing import sha256_file
from pipeline.common.json_files import read_json
from pipeline.data.chat_template import CONFIG_FILE, ChatTemplate
from pipeline.data.prompts import Template, resolve
from pipeline.data.tokenizer import load_tokenizer, read_metadata, tokenizer_fingerprint
from pipeline.model import lora
from pipeline.model.gpt import GPT, GPTConfig, ModelConfigError

WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"
CONFIG = "config.json"


def _state_dict_once(model: GPT) -> dict[str, torch.Tensor]:
    """State dict without the tied head's second name (safetensors refuses shared storage)."""
    state = model.state_dict()
    if model.cfg.tie_weights:
        state.pop("out_head.weight", None)
    return {
        k: v.detach().contiguous().cpu() for k, v in state.items()
    }  # safetensors writes contiguous CPU tensors


def save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors' ``save_file``; a full disk is an OSError naming ``path`` (safetensors says only its Rust error)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        if not any(sign in str(exc) for sign in ("code: 28", "code: 122", "StorageFull", "QuotaExceeded")):
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None


def save_model(directory: str | Path, model: GPT, **metadata: object) -> None:
    """Write ``model`` (unwrapped from DDP/compile by the caller) and its config into ``directory`` atomically."""
    if lora.adapter_info(model) is not None:
        raise ValueError("save_model: the model carries unmerged adapters (merge them, or use save_adapter)")
    with atomic_path(directory) as tmp:  # written beside, renamed into place only when complete
        tmp.mkdir()
        save_tensors(_state_dict_once(model), tmp / WEIGHTS)
        record = {"model": model.cfg.to_dict(), "sha256": {WEIGHTS: sha256_file(tmp / WEIGHTS)}, **metadata}
        (tmp / CONFIG).write_text(
            json.dumps(record, indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )


def save_adapter(directory: str | Path, model: GPT, base: str | Path, **metadata: object) -> None:
    """Write only what LoRA training changed, with a pointer to the ``base`` model directory it applies to."""
    info = lora.adapter_info(model)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        save_tensors(lora.adapter_state(model), tmp / ADAPTER)
        config = {
            "model": model.cfg.to_dict(),
            "sha256": {ADAPTER: sha256_file(tmp / ADAPTER)},
            "adapter": {"base": str(base), **info.to_dict()},
            **metadata,
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_trained(directory: str | Path, model: GPT, base: str | Path, **metadata: object) -> GPT:
    """A fine-tuning stage's result: merged into a plain model (the default), or as an adapter when
    ``lora.merge: false``. Returns the model to use afterwards (merged when it was merged)."""
    info = lora.adapter_info(model)
    if info is not None and not info.merge:
        save_adapter(directory, model, base, **metadata)
        return model
    model = lora.merge(model) if info is not None else model
    save_model(directory, model, **metadata)
    return model


def read_model_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG
    meta = read_json(path, "model config", f"has the stage that writes {directory} run?", shape=object)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise PipelineError(f"{path}: not a model config (no 'model' mapping)")
    tokenizer = meta.get("tokenizer")
    if tokenizer is not None and not (
        isinstance(tokenizer, dict)
        and all(isinstance(tokenizer.get(k, ""), str) for k in ("path", "fingerprint"))
    ):
        raise PipelineError(
            f"{path}: 'tokenizer' must be a mapping {{path, fingerprint}} of strings, got {tokenizer!r}"
        )
    return meta


def verify_weights(directory: Path, meta: dict, name: str = WEIGHTS) -> Path:
    """The weights file, after checking it against the sha256 that ``save_model`` recorded in config.json."""
    weights_path = directory / name
    if not weights_path.is_file():
        raise PipelineError(f"{weights_path}: weights not found")
    recorded = meta.get("sha256")
    expected = recorded.get(name) if isinstance(recorded, dict) else None
    if not isinstance(expected, str):
        raise PipelineError(
            f"{directory / CONFIG}: no sha256 recorded for {name} (written by an older version: "
            "re-run the stage that writes it)"
        )
    # A file garbled after its header still parses: only the hash tells.
    if sha256_file(weights_path) != expected:
        raise PipelineError(
            f"{weights_path}: contents do not match the sha256 recorded in {CONFIG} "
            "(corrupted or replaced; restore it with `dvc checkout` or re-run its stage)"
        )
    return weights_path


def load_state_into(model: GPT, weights: dict[str, torch.Tensor], origin: str) -> None:
    if model.cfg.tie_weights:  # tied, the head is tok_emb.weight; a foreign file may still hold a copy
        weights = {k: v for k, v in weights.items() if k != "out_head.weight"}
    expected = set(_state_dict_once(model))
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise PipelineError(
            f"{origin}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    own = model.state_dict()
    for name, tensor in weights.items():
        if own[name].shape != tensor.shape:
            raise PipelineError(
                f"{origin}: {name} has shape {tuple(tensor.shape)}, config expects {tuple(own[name].shape)}"
            )
    model.load_state_dict(
        weights, strict=False
    )  # not strict: the tied head has no entry (the checks above stand in)


def _load_adapted(directory: Path, meta: dict, cfg: GPTConfig) -> GPT:
    """Base model + adapter of a ``lora.merge: false`` directory, merged into a plain GPT."""
    record = dict(meta["adapter"])
    base_dir = Path(record.pop("base"))
    base, _ = load_model(base_dir)
    model = GPT(cfg)
    own = model.state_dict()
    # a layer whose shape differs (a classifier's new head) keeps GPT(cfg)'s init until the adapter file fills it
    base_state = {k: v for k, v in base.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(base_state, strict=False)  # a new head (train_fully) comes from the adapter file
    try:
        info = lora.AdapterInfo.from_dict(record)
    except TypeError as exc:
        raise PipelineError(f"{directory / CONFIG}: invalid adapter record ({exc})") from None
    model = lora.rebuild(model, info, f"{directory / CONFIG} (base {base_dir})")
    path = verify_weights(directory, meta, ADAPTER)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise PipelineError(f"{path}: missing or corrupt adapter file ({exc})") from None
    lora.load_adapter_state(model, tensors, str(path))
    return lora.merge(model)  # every consumer gets a plain GPT


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Load a model directory (an adapter directory: its base with the adapter merged in); returns
    (model in eval mode, the whole config.json)."""
    directory = Path(directory)
    meta = read_model_config(directory)
    try:
        cfg = GPTConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ModelConfigError) as exc:
        raise PipelineError(f"{directory / CONFIG}: invalid model config ({exc})") from None
    if "adapter" in meta:
        return _load_adapted(directory, meta, cfg).to(device).eval(), meta
    weights_path = verify_weights(directory, meta)
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise PipelineError(f"{weights_path}: corrupt weights file ({exc})") from None
    model = GPT(cfg)
    load_state_into(model, weights, str(weights_path))
    return model.to(device).eval(), meta


@dataclass
class ModelAndTokenizer:
    model: GPT
    meta: dict  # the model directory's config.json
    enc: tiktoken.Encoding
    tokenizer_fingerprint: str
    tokenizer_meta: dict  # the tokenizer's metadata.json (a base's chat template among it)
    template: (
        Template | None
    )  # the template the model was tuned in (native: the base's, resolved); None untuned


def tuned_template(meta: dict, tokenizer_meta: dict, enc: tiktoken.Encoding, origin: str) -> Template | None:
    """The template a model directory's config.json records (``instructions.template``): a name, or for
    ``native`` the tokenizer's chat template, which must be the one the model was tuned in."""
    name = (meta.get("instructions") or {}).get("template")
    if name is None:
        return None
    template = resolve(name, tokenizer_meta, enc, f"{origin}: instructions.template")
    recorded = (meta.get("instructions") or {}).get("chat_template_sha256")
    if isinstance(template, ChatTemplate) and recorded not in (None, template.sha256):
        raise PipelineError(
            f"{origin}: the model was tuned in chat template {str(recorded)[:12]}, but the tokenizer's "
            f"{CONFIG_FILE} holds {template.sha256[:12]} (rerun the stages from tokenize: dvc repro)"
        )
    return template


def load_with_tokenizer(
    model_dir: str | Path, tokenizer_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> ModelAndTokenizer:
    """A model and its tokenizer (``tokenizer_dir``, else the one its config.json records), refusing a model that
    was trained with another tokenizer."""
    model_dir = Path(model_dir)
    model, meta = load_model(model_dir, device)
    if tokenizer_dir is None:
        tokenizer_dir = (meta.get("tokenizer") or {}).get("path")
        if not isinstance(tokenizer_dir, str) or not tokenizer_dir:
            raise PipelineError(f"{model_dir / CONFIG}: no tokenizer.path recorded")
    tokenizer_dir = Path(tokenizer_dir)
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    recorded = (meta.get("tokenizer") or {}).get("fingerprint")
    if recorded != fingerprint:
        raise PipelineError(
            f"{model_dir / CONFIG}: model was trained with tokenizer {str(recorded)[:12]}, but {tokenizer_dir} is "
            f"{fingerprint[:12]} (rerun the stages from tokenize: dvc repro)"
        )
    enc = load_tokenizer(tokenizer_dir)
    if enc.n_vocab > model.cfg.vocab_size:  # spare embedding rows are harmless; a token without a row is not
        raise PipelineError(
            f"{model_dir / CONFIG}: vocab_size {model.cfg.vocab_size} < the tokenizer's {enc.n_vocab} tokens"
        )
    tokenizer_meta = read_metadata(tokenizer_dir)
    template = tuned_template(meta, tokenizer_meta, enc, str(model_dir / CONFIG))
    return ModelAndTokenizer(model, meta, enc, fingerprint, tokenizer_meta, template)


def _first_line(exc: BaseException) -> str:
    return one_line((str(exc).strip().splitlines() or [type(exc).__name__])[0])


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A foreign checkpoint's state dict (e.g. GPT-2's): safetensors, or a ``.bin`` read without executing pickled code."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise PipelineError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    try:
        state = torch.load(
            path, map_location="cpu", weights_only=True
        )  # pickled code raises UnpicklingError, not runs
    except pickle.UnpicklingError as exc:
        raise PipelineError(
            f"{path}: refused, loading it would run pickled code ({_first_line(exc)})"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise PipelineError(f"{path}: not a readable PyTorch weights file ({_first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"{path}: not a state dict of tensors")
    return state
