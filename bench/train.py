"""Training throughput and MFU: our loop (pipeline.train.loop) against the naive textbook model, same shapes, same run.

    python -m bench.train                       # CPU presets + gpt2-124m at context 256
    python -m bench.train --presets cpu-medium  # just one
    python -m bench.train --curves 40           # also: fp32 vs bf16 loss curves on data/shards → bench/

Each measurement runs in its own process (so its peak RSS is its own), alternating ours/naive for
``--rounds`` rounds; the median of each is reported. MFU = (6N + 12·L·d·T) × tokens/s over the matmul
rate of the dtype actually used, measured at the start of this run. The last line is a ``key=value``
summary for the default preset (params.yaml ``model.preset``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.common.config import TrainParams, load_params
from pipeline.model import perf
from pipeline.model.gpt import GPT, config_from_preset, flops_per_token
from pipeline.model.runtime import resolve_dtype
from pipeline.train.loop import train

ROOT = Path(__file__).resolve().parents[1]

# (preset, context, batch): the CPU presets at their own context; gpt2-124m at 256 as the issue asks.
SHAPES = {
    "cpu-tiny": (None, 16),
    "cpu-small": (None, 16),
    "cpu-medium": (None, 16),
    "gpt2-124m": (256, 4),
}


class RandomTokens:
    """Uniform random tokens: throughput does not depend on what the text says."""

    def __init__(self, vocab: int, batch: int, context: int):
        self.vocab, self.batch, self.context = vocab, batch, context

    def train_batch(self, step, micro_step, rank, world_size):
        g = torch.Generator().manual_seed(step * 7919 + micro_step)
        seq = torch.randint(0, self.vocab, (self.batch, self.context + 1), generator=g)
        return {"input_ids": seq[:, :-1], "targets": seq[:, 1:]}

    def eval_batches(self):
        return [self.train_batch(-1, 0, 0, 1)]

    def loss(self, model, batch):
        from pipeline.train.losses import lm_loss

        return lm_loss(model(batch["input_ids"])[0], batch["targets"]), {}

    def count_tokens(self, batch):
        return batch["targets"].numel()


def model_config(preset: str, context: int | None, vocab: int | None):
    return config_from_preset(preset, context_length=context, vocab_size=vocab)


def measure_ours(cfg, batch: int, warmup: int, steps: int, dtype: str, compile_: bool) -> float:
    torch.manual_seed(0)
    model = GPT(cfg)
    params = TrainParams(
        batch_size=batch,
        max_steps=warmup + steps,
        warmup_steps=warmup,
        log_every=warmup,
        eval_every=10**9,
        checkpoint_every=10**9,
        eval_batches=1,
        dtype=dtype,
        compile=compile_,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = train(
            model,
            RandomTokens(cfg.vocab_size, batch, cfg.context_length),
            params,
            checkpoint_dir=Path(tmp) / "ckpt",
            report_dir=Path(tmp) / "report",
            desc="ours",
        )
    return result.metrics["summary/tokens_per_s"]


def measure_naive(cfg, batch: int, warmup: int, steps: int) -> float:
    from bench.naive_gpt import NaiveGPTModel, train_step

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = NaiveGPTModel(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    data = RandomTokens(cfg.vocab_size, batch, cfg.context_length)
    for step in range(warmup + steps):
        if step == warmup:
            perf.synchronize(device)
            start = time.perf_counter()
        b = data.train_batch(step, 0, 0, 1)
        train_step(model, optimizer, b["input_ids"].to(device), b["targets"].to(device))
    perf.synchronize(device)
    return steps * batch * cfg.context_length / (time.perf_counter() - start)


def run_one(args) -> None:
    """Child process: one measurement, printed as JSON."""
    cfg = model_config(args.preset, args.context, args.vocab)
    if args.variant == "naive":
        tok_s = measure_naive(cfg, args.batch, args.warmup, args.steps)
    else:
        tok_s = measure_ours(cfg, args.batch, args.warmup, args.steps, args.dtype, args.compile)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens_per_s": tok_s, "peak_rss_mb": peak_rss_mb}))


def spawn(
    preset: str, variant: str, context, vocab, batch: int, warmup: int, steps: int, dtype: str, compile_: bool
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.train",
        "--one",
        "--preset",
        preset,
        "--variant",
        variant,
        "--batch",
        str(batch),
        "--warmup",
        str(warmup),
        "--steps",
        str(steps),
        "--dtype",
        dtype,
    ]
    cmd += ["--context", str(context)] if context else []
    cmd += ["--vocab", str(vocab)] if vocab else []
    cmd += ["--compile"] if compile_ else []
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measurement failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def loss_curves(steps: int, project: Path, out_png: Path) -> dict[str, float]:
    """Train the default profile for ``steps`` steps in fp32 and in bf16 on ``project``/data; plot both curves."""
    import dataclasses

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.train.pretrain_setup import prepare

    params = load_params(project / "params.yaml")
    final = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for dtype in ("fp32", "bf16"):
        p = dataclasses.replace(
            params.pretrain,
            dtype=dtype,
            max_steps=steps,
            eval_every=steps,
            checkpoint_every=steps,
            log_every=max(1, steps // 20),
        )
        setup = prepare(params.model, p, params.seed, project / "data/tokenizer", project / "data/shards")
        with tempfile.TemporaryDirectory() as tmp:
            result = train(
                setup.model,
                setup.objective,
                p,
                checkpoint_dir=Path(tmp) / "c",
                report_dir=Path(tmp) / "r",
                desc=dtype,
                data_fingerprint=setup.objective.fingerprint,
            )
            rows = (Path(tmp) / "r" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]
        xs, ys = zip(*((int(r.split("\t")[0]), float(r.split("\t")[1])) for r in rows), strict=False)
        seconds = result.metrics["summary/train_seconds"]
        ax.plot(xs, ys, label=f"{dtype}: val {result.metrics['val/loss']:.3f}, {seconds:.0f} s")
        final[f"{dtype}_val_loss"] = result.metrics["val/loss"]
        final[f"{dtype}_seconds"] = seconds
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(f"{params.model.preset}: fp32 vs bf16 autocast, same batches ({steps} steps)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="our loop's dtype (the naive model is always fp32)")
    parser.add_argument("--compile", action="store_true", help="our loop with torch.compile")
    parser.add_argument(
        "--curves", type=int, default=0, metavar="STEPS", help="also compare fp32/bf16 loss curves"
    )
    parser.add_argument(
        "--project", type=Path, default=ROOT, help="where data/shards and data/tokenizer are (--curves)"
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("ours", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return

    params = load_params(ROOT / "params.yaml")
    default_preset, vocab = params.model.preset, params.tokenizer.vocab_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    our_dtype = resolve_dtype(args.dtype, device)
    peak = {dt: perf.matmul_flops(device.type, dt, repeats=5) for dt in (torch.float32, torch.bfloat16)}
    print(
        f"device={device.type} threads={torch.get_num_threads()} matmul fp32={peak[torch.float32] / 1e9:.0f} "
        f"GFLOP/s bf16={peak[torch.bfloat16] / 1e9:.0f} GFLOP/s; ours uses {our_dtype}"
    )
    print(
        f"{'preset':<12}{'params':>9}{'ctx':>6}{'batch':>6}{'naive tok/s':>13}{'ours tok/s':>12}"
        f"{'speedup':>9}{'naive MFU':>11}{'our MFU':>9}{'RSS naive/ours MB':>19}"
    )
    results = {}
    for preset in args.presets:
        context, batch = SHAPES.get(preset, (None, 16))
        # The CPU presets train with the project's tokenizer vocabulary; gpt2-124m keeps GPT-2's.
        preset_vocab = vocab if preset.startswith("cpu-") else None
        cfg = model_config(preset, context, preset_vocab)
        steps = args.steps if cfg.n_embd < 768 else max(3, args.steps // 2)
        runs = {"ours": [], "naive": []}
        for _ in range(args.rounds):
            for variant in ("naive", "ours"):
                runs[variant].append(
                    spawn(
                        preset,
                        variant,
                        context,
                        preset_vocab,
                        batch,
                        args.warmup,
                        steps,
                        args.dtype,
                        args.compile,
                    )
                )
        n_params = GPT(cfg).num_params()
        flops = flops_per_token(cfg, n_params, cfg.context_length)
        naive = statistics.median(r["tokens_per_s"] for r in runs["naive"])
        ours = statistics.median(r["tokens_per_s"] for r in runs["ours"])
        row = {
            "tokens_per_s": ours,
            "naive_tokens_per_s": naive,
            "speedup_vs_naive": ours / naive,
            "mfu": perf.mfu(flops, ours, peak[our_dtype]),
            "naive_mfu": perf.mfu(flops, naive, peak[torch.float32]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs["ours"]),
            "naive_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["naive"]),
        }
        results[preset] = row
        print(
            f"{preset:<12}{n_params / 1e6:>8.1f}M{cfg.context_length:>6}{batch:>6}{naive:>13,.0f}{ours:>12,.0f}"
            f"{row['speedup_vs_naive']:>8.2f}x{row['naive_mfu']:>11.1%}{row['mfu']:>9.1%}"
            f"{row['naive_peak_rss_mb']:>10.0f}/{row['peak_rss_mb']:.0f}",
            flush=True,
        )

    curves = {}
    if args.curves:
        curves = loss_curves(args.curves, args.project, ROOT / "bench" / "loss_fp32_vs_bf16.png")
        print(
            "loss curves: "
            + ", ".join(f"{k}={v:.3f}" for k, v in curves.items())
            + " → bench/loss_fp32_vs_bf16.png"
        )

    summary_preset = default_preset if default_preset in results else next(iter(results))
    s = results[summary_preset]
    pairs = {
        "preset": summary_preset,
        "dtype": str(our_dtype).removeprefix("torch."),
        "tokens_per_s": f"{s['tokens_per_s']:.0f}",
        "naive_tokens_per_s": f"{s['naive_tokens_per_s']:.0f}",
        "speedup_vs_naive": f"{s['speedup_vs_naive']:.2f}",
        "mfu": f"{s['mfu']:.3f}",
        "naive_mfu": f"{s['naive_mfu']:.3f}",
        "peak_fp32_gflops": f"{peak[torch.float32] / 1e9:.0f}",
        "peak_bf16_gflops": f"{peak[torch.bfloat16] / 1e9:.0f}",
        "peak_rss_mb": f"{s['peak_rss_mb']:.0f}",
        **{k: f"{v:.3f}" for k, v in curves.items()},
    }
    print(" ".join(f"{k}={v}" for k, v in pairs.items()))


if __name__ == "__main__":
    main()
