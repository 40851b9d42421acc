"""Where a training step's time goes at the default shape: data, forward, backward, optimizer, and the loop's own overhead.

    python -m bench.profile_step                          # params.yaml's preset/batch/context on data/shards
    python -m bench.profile_step --shards DIR --tokenizer DIR --steps 6 --rounds 3

The phases are timed around the same calls ``pipeline.train.loop`` makes (on a CPU every op is synchronous, so
``perf_counter`` around a phase is its time). The loop's own overhead is the median step of ``pipeline.train.loop.train``
(from its per-step log) minus the median of the hand-timed step; both run alternately, ``--rounds`` times, so a
machine loaded by others slows both alike. A short ``torch.profiler`` trace of the hand-timed step lists the top
operators. The last line is a ``key=value`` summary.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.common.config import load_params
from pipeline.model.runtime import autocast, choose_dtype
from pipeline.train.loop import lr_factor, make_optimizer, train
from pipeline.train.pretrain_setup import prepare

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "forward", "backward", "optimizer")


def _setup(args: argparse.Namespace, steps: int):
    params = load_params(args.params)
    pre = replace(
        params.pretrain,
        max_steps=steps,
        log_every=1,
        eval_every=10**9,
        checkpoint_every=10**9,
        eval_batches=1,
        dtype=args.dtype,
    )
    setup = prepare(params.model, pre, params.seed, args.tokenizer, args.shards)
    return pre, setup


def hand_timed_steps(args: argparse.Namespace, trace: bool = False) -> tuple[list[dict[str, float]], object]:
    """The loop's step, phase by phase (data → forward → backward → clip + AdamW + schedule + zero_grad)."""
    pre, setup = _setup(args, args.steps)
    model, objective = setup.model, setup.objective
    device = torch.device("cpu")
    dtype = choose_dtype(pre.dtype, device, model.cfg, pre.batch_size * model.cfg.context_length).dtype
    optimizer = make_optimizer(model, pre, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, pre.warmup_steps, pre.max_steps, pre.min_lr_ratio)
    )
    model.train()
    rows, prof = [], None
    for step in range(args.steps):
        ctx = profile(activities=[ProfilerActivity.CPU]) if trace and step == args.steps - 1 else None
        if ctx is not None:
            ctx.__enter__()
        t = [time.perf_counter()]
        batch = objective.train_batch(step, 0, 0, 1)
        t.append(time.perf_counter())
        with autocast(device, dtype):
            loss, _ = objective.loss(model, batch)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), pre.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if ctx is not None:
            ctx.__exit__(None, None, None)
            prof = ctx
        rows.append(dict(zip(PHASES, (b - a for a, b in zip(t, t[1:], strict=False)), strict=True)))
    return rows[1:], prof  # the first step warms up the allocator and kernels


def loop_steps(args: argparse.Namespace) -> list[float]:
    """Seconds of each step of ``pipeline.train.loop.train`` itself, from its per-step tokens/s log."""
    pre, setup = _setup(args, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(
            setup.model,
            setup.objective,
            pre,
            checkpoint_dir=Path(tmp) / "ckpt",
            report_dir=Path(tmp) / "report",
            desc="loop",
        )
        del result
        history = _history(Path(tmp) / "report")
    tokens = pre.batch_size * setup.model.cfg.context_length
    return [tokens / r for r in history[1:]]


def _history(report_dir: Path) -> list[float]:
    path = report_dir / "plots" / "metrics" / "train" / "tokens_per_s.tsv"
    lines = path.read_text().splitlines()[1:]
    col = path.read_text().splitlines()[0].split("\t").index("tokens_per_s")
    return [float(line.split("\t")[col]) for line in lines]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--shards", type=Path, default=ROOT / "data" / "shards")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "data" / "tokenizer")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int, default=6, help="steps per measurement (the first is left out)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    phases: dict[str, list[float]] = {k: [] for k in PHASES}
    hand, loop, prof = [], [], None
    for r in range(args.rounds):
        rows, p = hand_timed_steps(args, trace=r == args.rounds - 1)
        prof = p or prof
        for row in rows:
            for k in PHASES:
                phases[k].append(row[k])
            hand.append(sum(row.values()))
        loop.extend(loop_steps(args))
    med = {k: statistics.median(v) for k, v in phases.items()}
    hand_s, loop_s = statistics.median(hand), statistics.median(loop)
    overhead = loop_s - hand_s
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"{'phase':<12}{'ms/step':>10}{'% of loop step':>16}")
    for k in PHASES:
        print(f"{k:<12}{med[k] * 1e3:>10.1f}{100 * med[k] / loop_s:>15.1f}%")
    print(f"{'loop other':<12}{overhead * 1e3:>10.1f}{100 * overhead / loop_s:>15.1f}%")
    print(
        f"{'loop step':<12}{loop_s * 1e3:>10.1f}{100.0:>15.1f}%   (median of {len(loop)} steps of pipeline.train.loop)"
    )
    print(
        f"threads={torch.get_num_threads()} hand_step_ms={hand_s * 1e3:.1f} loop_step_ms={loop_s * 1e3:.1f} "
        + " ".join(f"{k}_pct={100 * med[k] / loop_s:.1f}" for k in PHASES)
        + f" loop_overhead_pct={100 * overhead / loop_s:.1f}"
    )


if __name__ == "__main__":
    main()
