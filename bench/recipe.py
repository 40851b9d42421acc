"""The recipe, measured: validation bits per byte after a fixed wall budget of training, for a table of variants.

    python -m bench.recipe                                  # every variant, 300 s each, params.yaml on data/
    python -m bench.recipe --budget-s 90 --variants recipe,fp32,bf16,muon
    python -m bench.recipe --shards DIR --tokenizer DIR     # shards + tokenizer of another project

Each variant trains the default preset (params.yaml ``model`` + ``pretrain``) from the same initial seed on the
same batches for ``--budget-s`` seconds of training (evaluation excluded), then scores the first validation
windows with the evaluate stage's metric (``pipeline.evaluation.base_model.language_model_metrics``). The schedule is
today's (linear warmup + cosine to ``min_lr_ratio``) stretched over the wall budget instead of ``max_steps``,
so every variant ends its decay when its time is up. The variants run one after another in one process, so
a machine loaded by others can favour some: rerun with ``--variants`` in another order to check a close call.
The last line is a one-line summary against today's recipe.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pipeline.common.config import PretrainParams, load_params
from pipeline.common.errors import PipelineError, exit_on_error
from pipeline.data.shards import ShardDataset
from pipeline.data.tokenizer import load_tokenizer
from pipeline.evaluation.base_model import language_model_metrics, token_byte_lengths, unigram_log_probs
from pipeline.model.gpt import GPT
from pipeline.model.runtime import DTYPE_NAMES, autocast, choose_dtype
from pipeline.train.loop import lr_factor, make_optimizer
from pipeline.train.optim import muon_groups
from pipeline.train.pretrain_setup import prepare

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    """One change from today's recipe (params.yaml), everything else equal."""

    name: str
    dtype: str | None = None  # None: params.yaml's (auto)
    lr_mult: float = 1.0
    batch_size: int | None = None
    # None: params.yaml's, as the pipeline runs it | adamw | muon (torch.optim.Muon, bf16 Newton–Schulz) |
    # muon-fp32 | muon-bf16 (the pipeline's Muon, Newton–Schulz in that dtype)
    optimizer: str | None = None
    model: dict = field(
        default_factory=dict
    )  # ModelParams overrides (the head's tying, architecture options)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("recipe"),
        Variant("fp32", dtype="fp32"),
        Variant("bf16", dtype="bf16"),
        Variant("lr_x0.5", lr_mult=0.5),
        Variant("lr_x2", lr_mult=2.0),
        Variant("batch_8", batch_size=8),
        Variant("batch_32", batch_size=32),
        Variant("adamw", optimizer="adamw"),
        Variant("muon", optimizer="muon"),
        Variant("muon_fp32", optimizer="muon-fp32"),
        Variant("muon_bf16", optimizer="muon-bf16"),
        Variant("untied_head", model={"tie_weights": False}),
        Variant("rope", model={"pos_emb": "rope"}),
        Variant("rmsnorm", model={"norm": "rmsnorm"}),
        Variant("relu2", model={"mlp": "relu2"}),
        Variant("swiglu", model={"mlp": "swiglu"}),
        Variant("qk_norm", model={"qk_norm": True}),
        Variant("modern", model={"pos_emb": "rope", "norm": "rmsnorm", "mlp": "relu2", "qk_norm": True}),
    )
}


def make_optimizers(
    model: GPT, variant: Variant, pre: PretrainParams, dtype: torch.dtype
) -> list[torch.optim.Optimizer]:
    """The pipeline's optimizer (``pipeline.train.loop.make_optimizer``: params.yaml's as the stage runs it, AdamW, or
    ``MuonWithAdamW`` with its Newton–Schulz in fp32 or bf16), or ``torch.optim.Muon`` (bf16) beside AdamW."""
    cpu = torch.device("cpu")
    if variant.optimizer is None:
        return [make_optimizer(model, pre, cpu, dtype)]
    if variant.optimizer in ("adamw", "muon-fp32", "muon-bf16"):
        ns_dtype = torch.bfloat16 if variant.optimizer == "muon-bf16" else torch.float32
        pipeline_params = replace(pre, optimizer="adamw" if variant.optimizer == "adamw" else "muon")
        return [make_optimizer(model, pipeline_params, cpu, ns_dtype)]
    if variant.optimizer != "muon":
        raise PipelineError(f"unknown optimizer '{variant.optimizer}' (adamw | muon | muon-fp32 | muon-bf16)")
    groups = muon_groups(model, pre.weight_decay)
    muon = torch.optim.Muon(
        groups[0]["params"], lr=pre.lr, weight_decay=pre.weight_decay, adjust_lr_fn="match_rms_adamw"
    )
    adamw = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "muon"} for g in groups[1:]],
        lr=pre.lr,
        betas=(pre.beta1, pre.beta2),
    )
    return [muon, adamw]


@dataclass
class Outcome:
    variant: str
    dtype: str
    tokens_per_s: float
    steps: int
    train_s: float
    val_loss: float
    val_bpb: float


def run_variant(variant: Variant, args: argparse.Namespace) -> Outcome:
    params = args.loaded_params
    model_params = replace(params.model, **variant.model)
    pre = replace(
        params.pretrain,
        lr=params.pretrain.lr * variant.lr_mult,
        batch_size=variant.batch_size or params.pretrain.batch_size,
        dtype=variant.dtype or params.pretrain.dtype,
        mid_steps=0,  # the recipes are compared on the corpus alone (mid-training reads the SFT data)
    )
    setup = prepare(model_params, pre, params.seed, args.tokenizer, args.shards)
    model, objective = setup.model, setup.objective
    device = torch.device("cpu")
    dtype = choose_dtype(pre.dtype, device, model.cfg, pre.batch_size * model.cfg.context_length).dtype
    optimizers = make_optimizers(model, variant, pre, dtype)
    peaks = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    torch.manual_seed(pre.seed)
    model.train()
    step, tokens, elapsed = 0, 0, 0.0
    nominal = pre.max_steps  # the schedule's shape: warmup_steps of max_steps, stretched over the budget
    while elapsed < args.budget_s:
        start = time.perf_counter()
        factor = lr_factor(
            int(nominal * elapsed / args.budget_s), pre.warmup_steps, nominal, pre.min_lr_ratio
        )
        for opt, peak in zip(optimizers, peaks, strict=True):
            for group, lr in zip(opt.param_groups, peak, strict=True):
                group["lr"] = lr * factor
        batch = objective.train_batch(step, 0, 0, 1)
        with autocast(device, dtype):
            loss, _ = objective.loss(model, batch)
        loss.backward()
        if pre.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), pre.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if not math.isfinite(float(loss.detach())):
            raise PipelineError(f"variant {variant.name}: the loss diverged at step {step}")
        step += 1
        tokens += objective.count_tokens(batch)
        elapsed += time.perf_counter() - start
    metrics = language_model_metrics(
        model, args.val, args.unigram, args.byte_lengths, 16, args.eval_batches, dtype
    )
    return Outcome(
        variant.name,
        DTYPE_NAMES[dtype],
        tokens / elapsed,
        step,
        elapsed,
        metrics.val_loss,
        metrics.bits_per_byte,
    )


def _table(rows: list[Outcome], budget_s: float) -> str:
    lines = [
        f"| variant | dtype | tokens/s | steps in {budget_s:.0f} s | val loss | val bpb |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.variant} | {r.dtype} | {r.tokens_per_s:,.0f} | {r.steps} | {r.val_loss:.4f} | {r.val_bpb:.4f} |"
        for r in rows
    ]
    return "\n".join(lines)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--shards", type=Path, default=ROOT / "data" / "shards")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "data" / "tokenizer")
    ap.add_argument("--budget-s", type=float, default=300.0, help="seconds of training per variant")
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}"
    )
    ap.add_argument(
        "--eval-batches", type=int, default=50, help="validation windows of 16 × context, in order"
    )
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise PipelineError(
            f"--variants: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(VARIANTS)})"
        )
    if args.budget_s <= 0:
        raise PipelineError(f"--budget-s must be positive, got {args.budget_s}")
    for path in (args.shards, args.tokenizer):
        if not path.is_dir():
            raise PipelineError(f"{path}: not found (build it: make seed-cache && dvc repro tokenize)")
    args.loaded_params = load_params(args.params)  # once: an edit of the file during a run changes no variant
    enc = load_tokenizer(args.tokenizer)
    train = ShardDataset(args.shards, "train")
    args.val = ShardDataset(args.shards, "val")
    args.unigram = unigram_log_probs(train, enc.n_vocab)
    args.byte_lengths = token_byte_lengths(enc)
    rows = []
    for name in names:
        rows.append(run_variant(VARIANTS[name], args))
        r = rows[-1]
        print(
            f"{r.variant}: {r.dtype}, {r.steps} steps, {r.tokens_per_s:,.0f} tokens/s, val bpb {r.val_bpb:.4f}",
            flush=True,
        )
    print(_table(rows, args.budget_s))
    base = next((r for r in rows if r.variant == "recipe"), rows[0])
    best = min(rows, key=lambda r: r.val_bpb)
    print(
        f"budget_s={args.budget_s:g} threads={torch.get_num_threads()} baseline={base.variant} "
        f"baseline_bpb={base.val_bpb:.4f} best={best.variant} best_bpb={best.val_bpb:.4f} "
        f"delta_bpb={best.val_bpb - base.val_bpb:+.4f}"
    )


if __name__ == "__main__":
    main()
