"""nanoGPT side by side: its unmodified train.py and our loop, same shape, same steps, same shards, one evaluator.

    python -m bench.peer --nanogpt ../shared/peers/nanoGPT                 # params.yaml's shape and max_steps
    python -m bench.peer --nanogpt DIR --steps 40 --shards DIR --tokenizer DIR

nanoGPT reads ``data/<dataset>/{train,val}.bin`` (uint16 tokens) and ``meta.pkl`` (its vocabulary size) below its
working directory: both are written from our shards into a temp dir and nanoGPT runs there in a subprocess, on the
CPU, fp32, no compile (it uses no autocast on a CPU). Ours trains in ``pretrain.dtype`` (``auto``: the dtype this
machine measured faster, ``pipeline.model.runtime``; ``--dtype fp32`` for the same arithmetic as nanoGPT's) with
``pretrain.optimizer``. nanoGPT's hyperparameters are its train.py defaults (lr 6e-4, min_lr lr/10, AdamW betas
0.9/0.95, weight decay 0.1, clip 1.0, no dropout, no bias), fixed here in advance; only
what the shape and step count force is set: batch, context, width, depth, heads, max_iters, lr_decay_iters =
max_iters and warmup = ours (``pretrain.warmup_steps``, scaled with ``--steps``). Both final models are scored by
one function on the first ``--eval-batches`` validation windows in order. Our time-to-loss is read from our run's
own evaluations (the same windows, fp32) every ``--eval-every`` steps; nanoGPT's is its whole training time (its
loss still falls at its last step). The last line is ``ours_tok_s=… nanogpt_tok_s=… ours_val_loss=…
nanogpt_val_loss=… time_to_loss_speedup=…``.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle  # nanoGPT's vocabulary file format (written only, never loaded here)
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.common.config import load_params
from pipeline.common.errors import PipelineError, exit_on_error
from pipeline.data.shards import ShardDataset
from pipeline.model.runtime import DTYPE_NAMES, choose_dtype
from pipeline.train.loop import train
from pipeline.train.pretrain_setup import prepare

ROOT = Path(__file__).resolve().parents[1]
ITER_LINE = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")


@torch.no_grad()
def val_loss(logits_fn, val: ShardDataset, batch_size: int, context: int, batches: int) -> float:
    """Mean next-token cross-entropy over the first ``batches`` validation windows, in order (fp32)."""
    nats, tokens = 0.0, 0
    for x, y in val.sequential(batch_size, context, batches):
        logits = logits_fn(x).float()
        nats += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        tokens += y.numel()
    return nats / tokens


def write_nanogpt_data(shards: Path, dest: Path, vocab_size: int) -> None:
    """Our train/val tokens as nanoGPT's ``train.bin``/``val.bin`` (uint16) and ``meta.pkl``."""
    if vocab_size > 2**16:
        raise PipelineError(f"{shards}: vocabulary of {vocab_size} does not fit nanoGPT's uint16 tokens")
    dest.mkdir(parents=True)
    for split in ("train", "val"):
        tokens = np.concatenate([np.asarray(a) for a in ShardDataset(shards, split).arrays]).astype(np.uint16)
        tokens.tofile(dest / f"{split}.bin")
    with open(dest / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab_size}, f)


def run_nanogpt(
    nanogpt: Path, workdir: Path, cfg, batch: int, steps: int, warmup: int
) -> tuple[list[float], Path]:
    """nanoGPT's train.py in ``workdir``; returns its per-iteration seconds and the checkpoint after ``steps`` steps."""
    nanogpt = nanogpt.resolve()  # it runs with ``workdir`` as its cwd
    args = {
        "dataset": "ours",
        "out_dir": str(workdir / "out"),
        "device": "cpu",
        "dtype": "float32",
        "compile": False,
        "batch_size": batch,
        "block_size": cfg.context_length,
        "gradient_accumulation_steps": 1,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "max_iters": steps,
        "lr_decay_iters": steps,
        "warmup_iters": warmup,
        "eval_interval": steps,
        "eval_iters": 1,
        "log_interval": 1,
    }
    (workdir / "configurator.py").symlink_to(nanogpt / "configurator.py")  # train.py reads it from its cwd
    cmd = [sys.executable, str(nanogpt / "train.py")] + [f"--{k}={v}" for k, v in args.items()]
    proc = subprocess.run(
        cmd, cwd=workdir, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(nanogpt)}
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise PipelineError(f"{nanogpt / 'train.py'}: failed ({tail[0]})")
    times = {int(m[1]): float(m[2]) / 1e3 for m in map(ITER_LINE.match, proc.stdout.splitlines()) if m}
    # iter 0 includes nanoGPT's first eval and warm-up, iter ``steps`` its final eval plus one step past the end
    return [times[i] for i in range(1, steps) if i in times], workdir / "out" / "ckpt.pt"


def load_nanogpt(nanogpt: Path, ckpt: Path):
    sys.path.insert(0, str(nanogpt))
    try:
        from model import GPT as PeerGPT  # nanoGPT's model.py, imported from --nanogpt, not copied
        from model import GPTConfig as PeerConfig
    finally:
        sys.path.remove(str(nanogpt))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = PeerGPT(PeerConfig(**state["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state["model"].items()})
    return model.eval()


def crossing_time(step_seconds: list[float], val_points: list[tuple[int, float]], target: float) -> float:
    """Training seconds until the first evaluation at or below ``target`` (inf when never)."""
    for step, loss in val_points:
        if loss <= target:
            return sum(step_seconds[:step])
    return math.inf


def _tsv(path: Path, column: str) -> list[tuple[int, float]]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [
        (int(r[header.index("step")]), float(r[header.index(column)]))
        for r in (ln.split("\t") for ln in lines[1:])
    ]


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--nanogpt", type=Path, required=True, help="a nanoGPT checkout (its train.py and model.py)"
    )
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--shards", type=Path, default=ROOT / "data" / "shards")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "data" / "tokenizer")
    ap.add_argument("--steps", type=int, default=None, help="default: params.yaml pretrain.max_steps")
    ap.add_argument(
        "--eval-every", type=int, default=None, help="our evaluations for time-to-loss (default steps/10)"
    )
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default=None,
        help="our training dtype (default: params.yaml pretrain.dtype); nanoGPT's is always fp32",
    )
    args = ap.parse_args(argv)
    if not (args.nanogpt / "train.py").is_file():
        raise PipelineError(f"--nanogpt {args.nanogpt}: no train.py there")
    params = load_params(args.params)
    steps = args.steps or params.pretrain.max_steps
    warmup = max(
        1, round(params.pretrain.warmup_steps * steps / params.pretrain.max_steps)
    )  # same share of the run
    pre = replace(
        params.pretrain,
        max_steps=steps,
        warmup_steps=warmup,
        dtype=args.dtype or params.pretrain.dtype,
        log_every=1,
        checkpoint_every=10**9,
        eval_every=args.eval_every or max(1, steps // 10),
        eval_batches=args.eval_batches,
    )
    setup = prepare(params.model, pre, params.seed, args.tokenizer, args.shards)
    cfg, batch = setup.model.cfg, pre.batch_size
    ours_dtype = DTYPE_NAMES[
        choose_dtype(pre.dtype, torch.device("cpu"), cfg, batch * cfg.context_length).dtype
    ]
    val = ShardDataset(args.shards, "val")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_nanogpt_data(args.shards, tmp / "data" / "ours", cfg.vocab_size)
        peer_seconds, ckpt = run_nanogpt(args.nanogpt, tmp, cfg, batch, steps, pre.warmup_steps)
        peer = load_nanogpt(args.nanogpt, ckpt)
        peer_loss = val_loss(lambda x: peer(x, x)[0], val, batch, cfg.context_length, args.eval_batches)
        result = train(
            setup.model,
            setup.objective,
            pre,
            checkpoint_dir=tmp / "ckpt",
            report_dir=tmp / "report",
            desc="ours",
        )
        ours_loss = val_loss(lambda x: result.model(x)[0], val, batch, cfg.context_length, args.eval_batches)
        metrics = tmp / "report" / "plots" / "metrics"
        ours_rates = [r for _, r in _tsv(metrics / "train" / "tokens_per_s.tsv", "tokens_per_s")]
        ours_points = _tsv(metrics / "val" / "loss.tsv", "loss")
    tokens = batch * cfg.context_length
    ours_seconds = [tokens / r for r in ours_rates]
    ours_tok_s = tokens / statistics.median(ours_seconds[1:] or ours_seconds)
    peer_tok_s = tokens / statistics.median(peer_seconds)
    peer_time = (
        statistics.mean(peer_seconds) * steps
    )  # every step at its mean, iter 0 (warm-up + eval) left out
    ours_time = crossing_time(
        [statistics.median(ours_seconds[1:] or ours_seconds)] + ours_seconds[1:], ours_points, peer_loss
    )
    print(
        f"steps={steps} shape={params.model.preset}/b{batch}/ctx{cfg.context_length} ours={ours_dtype}/"
        f"{pre.optimizer} nanogpt=fp32/adamw "
        f"threads={torch.get_num_threads()} nanogpt_train_s={peer_time:.1f} ours_to_target_s={ours_time:.1f} "
        f"our evaluations: {' '.join(f'{s}:{v:.4f}' for s, v in ours_points)}",
        file=sys.stderr,
    )
    print(
        f"ours_tok_s={ours_tok_s:.0f} nanogpt_tok_s={peer_tok_s:.0f} ours_val_loss={ours_loss:.4f} "
        f"nanogpt_val_loss={peer_loss:.4f} time_to_loss_speedup={peer_time / ours_time:.2f}"
    )


if __name__ == "__main__":
    main()
