"""Pretraining setup: the model shape from params + tokenizer, checked against the shards, and its objective."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.common.config import ModelParams, PretrainParams
from pipeline.common.errors import PipelineError
from pipeline.data.instructions import Example
from pipeline.data.prompts import Template, encode_prompt, encode_response, resolve
from pipeline.data.shards import ShardDataset
from pipeline.data.tokenizer import load_tokenizer, read_metadata, tokenizer_fingerprint
from pipeline.model import gpt2_weights
from pipeline.model.gpt import GPT, GPTConfig, ModelConfigError, config_from_preset
from pipeline.model.runtime import local_device
from pipeline.train.objectives import PretrainObjective

LORA_SUGGESTED = 100_000_000  # parameters above which LoRA is the suggested fine-tuning on a CPU


def model_config(model: ModelParams, vocab_size: int, origin: str = "params.yaml") -> GPTConfig:
    """The preset with the explicit fields of ``model`` applied; the vocabulary is always the tokenizer's."""
    overrides = {
        name: getattr(model, name)
        for name in (
            "context_length",
            "n_embd",
            "n_head",
            "n_layer",
            "dropout",
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
    }
    try:
        return config_from_preset(model.preset, vocab_size=vocab_size, **overrides)
    except ModelConfigError as exc:
        raise PipelineError(f"{origin}: {exc}") from None


def training_context(params: PretrainParams, cfg: GPTConfig, origin: str = "params.yaml") -> int:
    """The training window: ``pretrain.context_length`` or the model's, never longer than its position table."""
    context = params.context_length or cfg.context_length
    if context > cfg.context_length:
        raise PipelineError(
            f"{origin}: pretrain.context_length={context} is longer than the model's position table "
            f"(model.context_length={cfg.context_length})"
        )
    return context


def pytorch_default_init(model: GPT) -> GPT:
    """The book's initialisation: every layer's own PyTorch default (Linear: Kaiming-uniform weights and uniform
    biases; Embedding: N(0, 1); LayerNorm and RMSNorm: ones and zeros) instead of GPT-2's N(0, 0.02)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm)):
            module.reset_parameters()
    return model


@dataclass
class PretrainSetup:
    model: GPT
    objective: PretrainObjective
    tokenizer_fingerprint: str
    params: PretrainParams  # as given, with max_steps from pretrain.epochs when set
    init: dict | None = None  # provenance of the starting checkpoint (model.init_from), None from scratch


def mid_training_tokens(enc, examples: Sequence[Example], template: Template) -> torch.Tensor:
    """``examples`` in ``template`` (prompt, answer, EOT) end to end: mid-training's text, read in windows."""
    ids = [
        t
        for e in examples
        for t in encode_prompt(enc, e.instruction, e.input, template, e.context)
        + encode_response(enc, e.output, template, e.instruction, e.input, e.context)
    ]
    return torch.tensor(ids, dtype=torch.long)


def prepare(
    model: ModelParams,
    params: PretrainParams,
    init_seed: int,
    tokenizer_dir: Path,
    shards_dir: Path,
    origin: str = "params.yaml",
    mid: Sequence[Example] = (),
    template: str = "alpaca",
) -> PretrainSetup:
    """Check params against the tokenizer and shards, then build the model: freshly initialised, or a checkpoint's
    weights (``model.init_from``) read only after its shape, tokenizer and memory needs passed the checks.
    With ``pretrain.mid_steps``, the last steps train on the instruction examples ``mid`` in ``template``."""
    enc = load_tokenizer(tokenizer_dir)
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    source = None
    if model.init_from != gpt2_weights.SCRATCH and model.init != "gpt2":
        raise PipelineError(
            f"{origin}: model.init={model.init} initialises a model from scratch; model.init_from={model.init_from} "
            "brings its own weights"
        )
    if model.init_from == gpt2_weights.SCRATCH:
        cfg = model_config(model, enc.n_vocab, origin)
    else:
        source = gpt2_weights.resolve(model.init_from, model.revision)
        cfg = gpt2_weights.checkpoint_config(source, enc.n_vocab, read_metadata(tokenizer_dir), model.dropout)
        gpt2_weights.check_shape(
            cfg, {name: getattr(model, name) for name in gpt2_weights.SHAPE_FIELDS}, source.label, origin
        )
    context = training_context(params, cfg, origin)
    train = ShardDataset(shards_dir, "train", expected_fingerprint=fingerprint)
    val = ShardDataset(shards_dir, "val", expected_fingerprint=fingerprint)
    objective = PretrainObjective(
        train,
        val,
        params.batch_size,
        context,
        params.seed,
        params.eval_batches,
        params.sampling,
        params.stride,
        params.grad_accum,
        mid_training_tokens(enc, mid, resolve(template, read_metadata(tokenizer_dir), enc, "sft.template"))
        if params.mid_steps
        else None,
    )
    if params.epochs is not None:
        per_step = (
            params.grad_accum * params.nproc_per_node * params.nnodes
        )  # batches one optimizer step takes, all workers
        params = replace(params, max_steps=math.ceil(params.epochs * objective.batches_per_epoch / per_step))
    objective.mid_from = params.max_steps - params.mid_steps
    torch.manual_seed(init_seed)  # the initial weights depend on init_seed alone
    if source is None:
        gpt = GPT(cfg)
        return PretrainSetup(
            pytorch_default_init(gpt) if model.init == "pytorch" else gpt, objective, fingerprint, params
        )
    training = params.max_steps > 0  # no steps: only the weights must fit
    device = local_device(params.device)
    needed = gpt2_weights.training_bytes(cfg, training, params.batch_size, context)
    gpt2_weights.check_fits(
        cfg, source.label, needed, gpt2_weights.available_bytes(device), str(device), training
    )
    gpt = gpt2_weights.load_weights(source, cfg)
    n_params = gpt.num_params(non_embedding=False)
    if (
        device.type == "cpu" and n_params > LORA_SUGGESTED
    ):  # full AdamW fine-tuning keeps 16 bytes per parameter
        print(
            f"note: model.init_from={source.label} has {n_params / 1e6:,.0f}M parameters: on a CPU, fine-tune it "
            "with LoRA (sft.lora.rank and dpo.lora.rank: 16) rather than in full",
            file=sys.stderr,
        )
    return PretrainSetup(gpt, objective, fingerprint, params, gpt2_weights.provenance(source))
