"""One process, 2 × DDP and 2 × FSDP training GPT-2 124M on this CPU: tokens/s and memory per rank.

    python -m bench.parallel                         # gpt2-124m, 4 steps of 2 × 128 tokens per rank, fp32
    python -m bench.parallel --preset cpu-small --steps 6

Each mode runs the real loop (pipeline.train.loop, ``parallel: ddp | fsdp``) in its own processes (torchrun for
two), on random tokens (speed and memory do not depend on what is learnt). Per rank it reports:
  state MB   parameters + gradients + AdamW moments held by this rank, counted from the tensors themselves at the
             last step (a DTensor counts its local shard; gradients have their parameters' layout, so they count
             as the trainable parameters' bytes); FSDP should hold ≈ 1/N of DDP's
  peak RSS   the process's high-water mark (every rank builds the whole model before FSDP shards it, and rank 0
             gathers it whole at the end, so RSS falls by less than the state does)
Tokens/s is the loop's (all ranks, first log window left out), against the one-process baseline of the same run.
The last line is a ``key=value`` summary of the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from pipeline.common.config import TrainParams
from pipeline.model.gpt import GPT, config_from_preset

ROOT = Path(__file__).resolve().parents[1]
MODES = {"single": (1, "ddp"), "ddp": (2, "ddp"), "fsdp": (2, "fsdp")}


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard
    return local.numel() * local.element_size()


class RandomTokens:
    """Batches of random token ids; at the evaluation after the last step it counts the state this rank holds
    (outside the timed steps: the optimizer is found by a heap walk)."""

    def __init__(self, vocab: int, context: int, batch_size: int):
        self.vocab, self.context, self.batch_size = vocab, context, batch_size
        self.state: dict[str, int] = {}

    def _batch(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        seq = torch.randint(0, self.vocab, (self.batch_size, self.context + 1), generator=generator)
        return {"input_ids": seq[:, :-1], "targets": seq[:, 1:]}

    def train_batch(self, step: int, micro_step: int, rank: int, world_size: int):
        return self._batch(torch.Generator().manual_seed(step * 1009 + rank))

    def eval_batches(self):
        return [self._batch(torch.Generator().manual_seed(999))]

    def loss(self, model, batch):
        if not model.training and not self.state:  # the one evaluation, after the last step
            self._count(model)
        logits, _ = model(batch["input_ids"])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten()), {}

    def count_tokens(self, batch) -> int:
        return batch["targets"].numel()

    def _count(self, model) -> None:
        params = {id(p): p for p in model.parameters()}.values()  # a tied matrix once
        with warnings.catch_warnings():  # some objects warn when isinstance inspects them
            warnings.simplefilter("ignore")
            optimizers = [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)]
        moments = [t for o in optimizers for s in o.state.values() for t in s.values() if torch.is_tensor(t)]
        self.state = {
            "params": sum(_local_bytes(p) for p in params),
            "grads": sum(_local_bytes(p) for p in params if p.requires_grad),
            "optimizer": sum(_local_bytes(t) for t in moments),
        }


def worker(args: argparse.Namespace) -> None:
    """One rank of one mode: train, then write this rank's figures."""
    from pipeline.train.loop import train  # noqa: PLC0415 — the workers only

    torch.manual_seed(0)
    model = GPT(config_from_preset(args.preset, context_length=args.context))
    params = TrainParams(
        batch_size=args.batch_size,
        max_steps=args.steps,
        warmup_steps=1,
        lr=1e-4,
        dtype="fp32",  # the memory accounting in the dtype the weights are kept in
        eval_every=10_000,
        eval_batches=1,
        checkpoint_every=10_000,
        log_every=1,
        parallel=args.parallel,
    )
    objective = RandomTokens(model.cfg.vocab_size, args.context, args.batch_size)
    out = Path(args.out)
    result = train(
        model, objective, params, checkpoint_dir=out / "ckpt", report_dir=out / "report", desc=args.mode
    )
    rank = int(os.environ.get("RANK", 0))
    figures = {
        "state": objective.state,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "tokens_per_s": result.metrics.get("summary/tokens_per_s"),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(figures))


def run_mode(mode: str, args: argparse.Namespace, out: Path) -> list[dict]:
    nproc, parallel = MODES[mode]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [
        *launcher,
        "-m",
        "bench.parallel",
        "--worker",
        "--mode",
        mode,
        "--parallel",
        parallel,
        "--out",
        str(out),
    ]
    cmd += ["--preset", args.preset, "--steps", str(args.steps), "--context", str(args.context)]
    cmd += ["--batch-size", str(args.batch_size)]
    threads = max(1, (os.cpu_count() or 1) // nproc)  # the machine's cores shared out, as torchrun would
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            results[mode] = run_mode(mode, args, Path(tmp) / mode)
    mb = 1 / 2**20
    base = results.get("single", [{}])[0].get("tokens_per_s")
    print(f"{args.preset}, {args.steps} steps of {args.batch_size} × {args.context} tokens per rank, fp32")
    print(
        f"{'mode':8} {'rank':>4} {'tokens/s':>9} {'vs 1':>5} {'params':>8} {'grads':>8} {'adamw':>8} "
        f"{'state MB':>9} {'peak RSS MB':>12}"
    )
    for mode, ranks in results.items():
        for r, fig in enumerate(ranks):
            s = fig["state"]
            speed = ranks[0]["tokens_per_s"]
            print(
                f"{mode:8} {r:>4} {speed:>9.0f} {speed / base if base else float('nan'):>5.2f} "
                f"{s['params'] * mb:>8.1f} {s['grads'] * mb:>8.1f} {s['optimizer'] * mb:>8.1f} "
                f"{sum(s.values()) * mb:>9.1f} {fig['peak_rss'] * mb:>12.0f}"
            )
    if "ddp" in results and "fsdp" in results:
        state = max(sum(f["state"].values()) for f in results["fsdp"]) / max(
            sum(f["state"].values()) for f in results["ddp"]
        )
        rss = max(f["peak_rss"] for f in results["fsdp"]) / max(f["peak_rss"] for f in results["ddp"])
        speed = results["fsdp"][0]["tokens_per_s"] / results["ddp"][0]["tokens_per_s"]
        print(
            f"fsdp_over_ddp_state={state:.3f} fsdp_over_ddp_peak_rss={rss:.3f} fsdp_over_ddp_tokens_s={speed:.3f}"
        )


if __name__ == "__main__":
    main()
