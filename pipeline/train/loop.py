"""The ONE training loop: pretraining, SFT and DPO differ only in the Objective passed in.

The loop owns everything that is not the objective's arithmetic: device, dtype (params, or measured on this
machine: ``runtime.choose_dtype``) and autocast, the optimizer (``optimizer: muon`` in params.yaml, Muon for the
blocks' matrices and AdamW for the rest, or AdamW alone), linear warmup + cosine decay, clipping, accumulation,
DDP or FSDP2 (``parallel``, torchrun env; ``train/sharded.py``), eval cadence, atomic checkpoints and exact
resume, the progress bar, and dvclive metrics in ``report_dir`` (``metrics.json`` + ``plots/metrics/**.tsv``
with ``step`` on x, which `dvc plots` / `dvc exp show` read).

Exact resume: batches are a pure function of (step, micro_step, rank) and the checkpoint holds model,
optimizer, scheduler and RNG states, so a run killed and resumed ends with the same weights, bit for bit.
A run resumed with another world size keeps the first session's batches: each step's (micro_step, rank) slots
are dealt out over the ranks it has now (the same global batch; the sums in another order, so not bitwise).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.common.config import TrainParams
from pipeline.common.errors import PipelineError
from pipeline.model import perf
from pipeline.model.gpt import GPT, flops_per_token
from pipeline.model.runtime import DTYPE_NAMES, autocast, choose_dtype, local_device
from pipeline.train import distributed, resume, sharded
from pipeline.train.optim import MuonWithAdamW, muon_groups

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

# Params that change how often things happen, not what is computed: a resumed run may change them.
_CADENCE_PARAMS = {
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "compile",
    "device",
    "nproc_per_node",
    "nnodes",
    "rdzv_endpoint",
    "max_restarts",
    "rdzv_timeout",
}


class Objective(Protocol):
    def train_batch(self, step: int, micro_step: int, rank: int, world_size: int) -> Batch:
        """Deterministic in its arguments, so a resumed (or DDP) run sees exactly the same batches."""

    def eval_batches(self) -> Iterable[Batch]:
        """Finite and deterministic."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss and extra metrics; the loop averages them and logs train/<name> and val/<name>."""

    def count_tokens(self, batch: Batch) -> int: ...


@dataclass
class TrainResult:
    model: GPT  # unwrapped (no DDP, no compile; FSDP's gathered whole on rank 0 only), in eval mode
    metrics: dict[str, float] = field(default_factory=dict)


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup to 1, then cosine down to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps  # step + 1: the first step already learns
    decay_steps = max_steps - warmup_steps
    if decay_steps <= 0:  # all warmup: nothing left to decay over
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)  # past max_steps the lr stays at the floor
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    model: GPT, params: TrainParams, device: torch.device, ns_dtype: torch.dtype = torch.float32
) -> torch.optim.Optimizer:
    """``params.optimizer``: AdamW over the model's decay/no-decay groups (fused kernels where this torch has
    them), or Muon for the blocks' matrices with AdamW for the rest, its Newton–Schulz in ``ns_dtype``."""
    kwargs = dict(lr=params.lr, betas=(params.beta1, params.beta2))
    if params.optimizer == "muon":
        return MuonWithAdamW(muon_groups(model, params.weight_decay), ns_dtype=ns_dtype, **kwargs)
    groups = model.optimizer_groups(params.weight_decay)
    try:
        return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel in this torch here: foreach is the portable fast path
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def run_key(model: GPT, params: TrainParams, data_fingerprint: str) -> str:
    """Identity of a run: what decides the trajectory (shape, initial weights, math params, data).

    Not the world size: a checkpoint carries its batch layout, which a resume with other ranks keeps."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().view(torch.uint8).numpy()
        )  # raw bytes: numpy has no bf16
    math_params = {
        k: v for k, v in asdict(params).items() if k not in _CADENCE_PARAMS
    }  # cadence may change on resume
    identity = {
        "model": model.cfg.to_dict(),
        "params": math_params,
        "data": data_fingerprint,
        "weights": digest.hexdigest(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


class MetricsLog:
    """dvclive on rank 0; keeps the history too, so a resumed run re-emits complete curves."""

    def __init__(self, report_dir: Path, enabled: bool, history: list[dict]):
        self.history = list(history)
        self.live = None
        if enabled:
            from dvclive import Live

            self.live = Live(dir=str(report_dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)
            # dvclive starts its files afresh; the checkpoint's history refills them
            for row in self.history:
                self._emit(row["step"], row["metrics"])
            self.flush()

    def _emit(self, step: int, metrics: dict[str, float]) -> None:
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append({"step": step, "metrics": metrics})
        if self.live is not None:
            self._emit(step, metrics)

    def latest(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for row in self.history:
            out.update(row["metrics"])
        return out

    def flush(self, summary: dict[str, float] | None = None) -> None:
        if self.live is None:
            return
        for name, value in (summary or {}).items():
            self.live.log_metric(name, value, plot=False)
        self.live.make_summary()


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _seq_len(batch: Batch, default: int) -> int:
    return max((t.shape[-1] for t in batch.values() if t.dim() >= 2), default=default)


def _all_reduce_mean(values: dict[str, float], ctx: distributed.DistContext) -> dict[str, float]:
    if not ctx.enabled or not values:
        return values
    names = sorted(values)
    t = torch.tensor([values[n] for n in names], dtype=torch.float64)  # one collective for all the metrics
    if dist.get_backend() == "nccl":
        t = t.cuda()  # NCCL reduces GPU tensors only
    dist.all_reduce(t)  # a sum over the ranks
    return {n: float(v) / ctx.world_size for n, v in zip(names, t.tolist(), strict=False)}


class _Trainer:
    def __init__(
        self,
        model: GPT,
        objective: Objective,
        params: TrainParams,
        checkpoint_dir: Path,
        report_dir: Path,
        desc: str,
        data_fingerprint: str,
    ):
        self.params, self.objective, self.desc = params, objective, desc
        self.checkpoint_dir, self.report_dir = Path(checkpoint_dir), Path(report_dir)
        self.device = local_device(params.device)
        self.ctx = distributed.setup(self.device)
        self.dtype_choice = choose_dtype(
            params.dtype, self.device, model.cfg, params.batch_size * model.cfg.context_length
        )
        self.dtype = self.dtype_choice.dtype
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = (
                True  # fp32 matmuls on tensor cores
            )
        self.raw = model.to(self.device)  # the bare module: what is saved, evaluated and returned
        self.key = run_key(self.raw, params, data_fingerprint)
        self.fsdp = params.parallel == "fsdp"  # its checkpoints are sharded even in one process
        self.whole = None  # FSDP: the unsharded skeleton the weights are gathered into at the end
        if self.fsdp and self.ctx.enabled:
            self.whole = sharded.skeleton(self.raw)
            sharded.shard(self.raw, self.raw.blocks, self.dtype)  # in place: the optimizer sees the shards
        self.optimizer = make_optimizer(
            self.raw, params, self.device, self.dtype
        )  # Muon's Newton–Schulz in the training dtype
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, params.warmup_steps, params.max_steps, params.min_lr_ratio),
        )
        self.timed: list[list[float]] = []  # [tokens, seconds] of each log window, kept across resumes
        # the batch slots of a step: ranks × micro-steps (a resumed run keeps its checkpoint's)
        self.layout = (self.ctx.world_size, params.grad_accum)
        self.best: dict | None = None  # keep: best_*, the best evaluation so far (step, val metrics, weights)
        self.step, self.tokens_seen, history = self._restore()
        self.slots = self._my_slots()
        self.metrics = MetricsLog(self.report_dir, self.ctx.is_main, history)
        self.train_model = self._wrap(self.raw)  # DDP-wrapped under torchrun, else the raw module
        # compile: the objective's whole loss (forward, fp32 upcast, cross-entropy) as one graph, so the upcast
        # logits are never materialised (the gain over compiling the model alone: BENCHMARKS.md)
        self.loss_fn = torch.compile(objective.loss) if params.compile else objective.loss
        self.compile_checked = not params.compile  # the first compiled step may still fall back to eager
        measured = {
            torch.float32: self.dtype_choice.fp32_gflops,
            torch.bfloat16: self.dtype_choice.bf16_gflops,
        }
        rate = measured.get(self.dtype)
        self.peak_flops = (
            rate * 1e9 if rate else perf.matmul_flops(self.device.type, self.dtype)
        )  # MFU's denominator
        self._announce()
        self.n_params = self.raw.num_params()
        unique = {id(p): p for p in self.raw.parameters()}.values()  # by id: a tied matrix counts once
        self.trainable = (sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique))
        if self.ctx.is_main:
            log.warning(
                "%s: training %s of %s parameters (%.2f%%)",
                desc,
                f"{self.trainable[0]:,}",
                f"{self.trainable[1]:,}",
                100 * self.trainable[0] / self.trainable[1],
            )
        self.seq_len = self.raw.cfg.context_length  # updated from the batches, for the FLOPs estimate

    # -- setup ---------------------------------------------------------------------------------
    def _announce(self) -> None:
        if not self.ctx.is_main:
            return
        rates = ", ".join(
            f"{k} {v}" for k, v in self.dtype_choice.as_metrics().items() if k.endswith("gflops")
        )
        print(
            f"{self.desc}: {self.device.type}, {torch.get_num_threads()} torch threads, "
            f"{DTYPE_NAMES[self.dtype]} ({self.dtype_choice.source}{'; GFLOP/s ' + rates if rates else ''})",
            file=sys.stderr,
        )

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.ctx.enabled or self.fsdp:  # FSDP wrapped the module in place
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def _restore(self) -> tuple[int, int, list[dict]]:
        shards = resume.Shards(self.optimizer, self.ctx.is_main) if self.fsdp else None
        restored = resume.restore_latest(self.checkpoint_dir, self.raw, self.key, shards)
        torch.manual_seed(self.params.seed + self.ctx.rank)  # + rank: each rank its own dropout masks
        if restored is None:
            return 0, 0, []
        trainer, state = restored.trainer, restored.state
        if shards is None:
            self.optimizer.load_state_dict(trainer["optimizer"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        position = state["data_position"]
        self.layout = (position["world_size"], position["micro_steps"])
        if self.ctx.rank < len(trainer["rng"]["torch"]):  # a rank the saved run had continues its own stream
            torch.set_rng_state(trainer["rng"]["torch"][self.ctx.rank])
            if self.device.type == "cuda" and trainer["rng"].get("cuda"):
                torch.cuda.set_rng_state(trainer["rng"]["cuda"][self.ctx.rank], self.device)
        if self.ctx.is_main:
            log.warning("%s: resuming from %s (step %d)", self.desc, restored.path, state["step"])
        self.timed = [list(w) for w in state.get("timed", [])]
        self.best = trainer.get("best")
        return state["step"], state["tokens_seen"], state["history"]

    def _my_slots(self) -> list[tuple[int, int]]:
        """This rank's (micro_step, rank) slots of each step, in the layout the run started with."""
        ranks, micro_steps = self.layout
        slots = [(m, r) for m in range(micro_steps) for r in range(ranks)]
        if len(slots) % self.ctx.world_size:
            raise PipelineError(
                f"{self.desc}: the checkpoint's steps hold {ranks} rank(s) × {micro_steps} micro-step(s) of "
                f"batches, which {self.ctx.world_size} processes cannot share evenly (nproc_per_node × nnodes)"
            )
        return slots[self.ctx.rank :: self.ctx.world_size]  # unchanged world size: this rank's own slots

    # -- checkpoints ---------------------------------------------------------------------------
    def _gather_rng(self) -> dict[str, list[torch.Tensor]]:
        local = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            local["cuda"] = torch.cuda.get_rng_state(self.device)
        if not self.ctx.enabled:
            return {k: [v] for k, v in local.items()}
        gathered: list[dict] = [None] * self.ctx.world_size
        # A collective: every rank calls it, though only rank 0 writes the checkpoint.
        dist.all_gather_object(gathered, {k: v.cpu() for k, v in local.items()})
        return {k: [g[k] for g in gathered] for k in local}

    def _save_checkpoint(self) -> None:
        rng = self._gather_rng()
        trainer = {
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            **({"best": self.best} if self.best else {}),  # the best so far survives a resume
        }
        state = {
            "run_key": self.key,
            "tokens_seen": self.tokens_seen,
            # where the batches resume: they are a pure function of (step, micro_step, rank), laid out as
            # the run's first session had them
            "data_position": {
                "next_step": self.step,
                "micro_steps": self.layout[1],
                "world_size": self.layout[0],
            },
            "history": self.metrics.history,
            "timed": self.timed,
        }
        if self.fsdp:  # a collective: every rank writes its shards
            shards = resume.Shards(self.optimizer, self.ctx.is_main)
            resume.save_sharded_checkpoint(self.checkpoint_dir, self.step, self.raw, shards, trainer, state)
        elif self.ctx.is_main:
            trainer["optimizer"] = self.optimizer.state_dict()
            resume.save_checkpoint(self.checkpoint_dir, self.step, self.raw, trainer, state)
        if self.ctx.is_main:
            resume.prune(self.checkpoint_dir, self.key, self.params.keep_checkpoints)
        if self.ctx.enabled:
            dist.barrier()  # no rank runs on while rank 0 writes

    # -- one step ------------------------------------------------------------------------------
    def _forward_backward(
        self, batch: Batch, last_micro: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sync = contextlib.nullcontext()
        if self.ctx.enabled and self.fsdp:
            sharded.set_gradient_sync(self.train_model, last_micro)  # reduce-scatter on the last micro-step
        elif self.ctx.enabled and not last_micro:
            sync = self.train_model.no_sync()  # DDP all-reduces the gradients on the last micro-step only
        with sync:
            with autocast(self.device, self.dtype):
                loss, extras = self.loss_fn(self.train_model, batch)
            (loss / len(self.slots)).backward()  # the summed gradients are the mean over the micro-steps
        return loss.detach(), {k: v.detach() for k, v in extras.items()}  # values for the log, not graphs

    def _checked_forward_backward(self, batch: Batch, last_micro: bool):
        """The first compiled call is where torch.compile fails when it fails: fall back to eager then."""
        if self.compile_checked:
            return self._forward_backward(batch, last_micro)
        self.compile_checked = True
        try:
            return self._forward_backward(batch, last_micro)
        except Exception as exc:  # noqa: BLE001 — any compiler failure means "run eagerly"
            log.warning(
                "torch.compile failed (%s: %s); training eagerly",
                exc.__class__.__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            self.optimizer.zero_grad(set_to_none=True)  # drop whatever the failed call left in .grad
            self.loss_fn = self.objective.loss
            return self._forward_backward(batch, last_micro)

    def _train_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, torch.Tensor | None]:
        p = self.params
        loss_sum = torch.zeros((), device=self.device)
        extra_sums: dict[str, torch.Tensor] = {}
        tokens = 0
        ranks = self.layout[0]
        for i, (micro, rank) in enumerate(self.slots):
            batch = _to_device(self.objective.train_batch(self.step, micro, rank, ranks), self.device)
            loss, extras = self._checked_forward_backward(batch, i == len(self.slots) - 1)
            loss_sum += loss.float()  # stays on the device: no host sync per micro-step
            for k, v in extras.items():
                extra_sums[k] = extra_sums.get(k, 0) + v.float()
            tokens += self.objective.count_tokens(batch)
            self.seq_len = _seq_len(batch, self.seq_len)
        self.step_lr = self.scheduler.get_last_lr()[0]  # the lr this step uses, for the log
        grad_norm = None
        if p.grad_clip > 0:  # under DDP the gradients are already averaged: every rank clips the same ones
            grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), p.grad_clip)
        self.optimizer.step()
        self.scheduler.step()  # after optimizer.step, as torch requires: the next step's lr
        self.optimizer.zero_grad(set_to_none=True)
        extras = {k: v / len(self.slots) for k, v in extra_sums.items()}
        return loss_sum / len(self.slots), extras, tokens, grad_norm

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted mean loss and extras over the objective's eval batches (every rank alike)."""
        self.raw.eval()
        totals: dict[str, float] = {}
        weight_sum = 0
        for batch in self.objective.eval_batches():
            batch = _to_device(batch, self.device)
            with autocast(self.device, self.dtype):
                loss, extras = self.objective.loss(
                    self.raw, batch
                )  # the raw module, eagerly: no DDP, no compile
            weight = max(1, self.objective.count_tokens(batch))  # a batch's mean loss weighs as its tokens
            weight_sum += weight
            for name, value in {"loss": loss, **extras}.items():
                totals[name] = totals.get(name, 0.0) + float(value) * weight
        self.raw.train()
        if weight_sum == 0:
            raise PipelineError(f"{self.desc}: the objective produced no evaluation batches")
        return {f"val/{k}": v / weight_sum for k, v in totals.items()}

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        p = self.params
        self.raw.train()
        quiet = {} if self.ctx.is_main else {"disable": True}  # rank 0 only; TQDM_DISABLE=1 silences it too
        bar = tqdm(
            total=p.max_steps, initial=self.step, desc=self.desc, dynamic_ncols=True, unit="step", **quiet
        )
        window = _Window(self.device)
        timed = self.timed
        while self.step < p.max_steps:
            t0 = time.perf_counter()
            loss, extras, tokens, grad_norm = self._train_step()
            self.step += 1
            self.tokens_seen += tokens * self.ctx.world_size  # all ranks: this rank's count times the ranks
            window.add(loss, extras, tokens)
            bar.update(1)
            if self.step % p.log_every == 0 or self.step == p.max_steps:
                row = window.close(self.ctx)  # synchronises with the device: the timing below is honest
                window.seconds += time.perf_counter() - t0
                timed.append([window.tokens, window.seconds])
                self._log_train(row, window, grad_norm, bar)
                window = _Window(self.device)
            else:
                window.seconds += time.perf_counter() - t0
            if self.step % p.eval_every == 0 or self.step == p.max_steps:
                val = self.evaluate()
                self.metrics.log(self.step, val)
                self._remember_if_best(val)
                if self.ctx.is_main:
                    bar.write(f"{self.desc} step {self.step}: val loss {val['val/loss']:.4f}")
            if self.step % p.checkpoint_every == 0 or self.step == p.max_steps:
                self.metrics.flush()
                self._save_checkpoint()
        bar.close()
        if not any("val/loss" in row["metrics"] for row in self.metrics.history):
            self.metrics.log(self.step, self.evaluate())
        summary = {
            **self._summary(timed),
            "summary/trainable_params": float(self.trainable[0]),
            "summary/trainable_share": self.trainable[0] / self.trainable[1],
        }
        if self.best:
            self.raw.load_state_dict(self.best["weights"])
            summary["summary/best_step"] = float(self.best["step"])
            summary |= {f"summary/best_{k.removeprefix('val/')}": v for k, v in self.best["val"].items()}
        self.metrics.flush(summary)
        model = self.raw
        if self.whole is not None:  # FSDP: the whole model on rank 0 (other ranks keep their shards)
            model = sharded.gather_whole(self.raw, self.whole, self.ctx.is_main, self.device)
        model.eval()
        return TrainResult(model, {**self.metrics.latest(), **summary, "step": self.step})

    def _remember_if_best(self, val: dict[str, float]) -> None:
        """With ``keep: best_*``: a copy of the weights of the best evaluated step so far (lowest val loss, or
        highest val accuracy; the earlier step on a tie)."""
        if self.params.keep == "last":
            return
        metric = self.params.keep.removeprefix("best_")
        name = f"val/{metric}"
        if name not in val:
            raise PipelineError(
                f"{self.desc}: keep: {self.params.keep}, but its validation reports no {name}"
            )
        score = -val[name] if metric == "loss" else val[name]  # higher is better
        if not self.best or score > self.best["score"]:
            weights = {k: v.detach().clone() for k, v in self.raw.state_dict().items()}
            self.best = {"step": self.step, "score": score, "val": val, "weights": weights}

    def _log_train(self, row: dict[str, float], window: "_Window", grad_norm, bar: tqdm) -> None:
        tok_s = window.tokens * self.ctx.world_size / max(window.seconds, 1e-9)  # all ranks together
        row["train/lr"] = self.step_lr
        if grad_norm is not None:  # FSDP: a DTensor, its value shared by every rank
            row["train/grad_norm"] = float(
                grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            )
        row["train/tokens_per_s"] = tok_s
        row["train/mfu"] = self._mfu(tok_s)
        row["train/tokens_seen"] = float(self.tokens_seen)
        bar.set_postfix(
            loss=f"{row['train/loss']:.3f}",
            lr=f"{row['train/lr']:.2e}",
            tok_s=f"{tok_s:,.0f}",
            mfu=f"{row['train/mfu']:.1%}",
        )
        self.metrics.log(self.step, row)

    def _mfu(self, tokens_per_s: float) -> float:
        """Per-device MFU: the ranks' FLOP/s over the measured matmul rate of the dtype, times the ranks."""
        flops = flops_per_token(self.raw.cfg, self.n_params, self.seq_len)
        return perf.mfu(flops, tokens_per_s, self.peak_flops * self.ctx.world_size)

    def _summary(self, timed: list[list[float]]) -> dict[str, float]:
        """The run's throughput over all its sessions (a resumed-and-finished run re-reports it)."""
        steady = (
            timed[1:] or timed
        )  # the first log window holds warm-up and compilation: left out when there are more
        tokens, seconds = sum(t for t, _ in steady), sum(s for _, s in steady)
        if seconds <= 0:
            return {}
        tok_s = tokens * self.ctx.world_size / seconds
        return {
            "summary/tokens_per_s": tok_s,
            "summary/mfu": self._mfu(tok_s),
            "summary/peak_matmul_gflops": self.peak_flops / 1e9,
            "summary/train_seconds": sum(s for _, s in timed),
            "summary/bf16": float(self.dtype == torch.bfloat16),
            "summary/threads": float(torch.get_num_threads()),
            **{
                f"summary/dtype_{k}": v
                for k, v in self.dtype_choice.as_metrics().items()
                if k.endswith("gflops")
            },
        }


class _Window:
    """Running sums between two log points, kept on the device (no per-step host sync)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.extras: dict[str, torch.Tensor] = {}
        self.steps = self.tokens = 0
        self.seconds = 0.0

    def add(self, loss: torch.Tensor, extras: dict[str, torch.Tensor], tokens: int) -> None:
        self.loss += loss
        for k, v in extras.items():
            self.extras[k] = self.extras.get(k, 0) + v
        self.steps += 1
        self.tokens += tokens

    def close(self, ctx: distributed.DistContext) -> dict[str, float]:
        row = {"train/loss": float(self.loss) / self.steps}
        row.update({f"train/{k}": float(v) / self.steps for k, v in self.extras.items()})
        return _all_reduce_mean(row, ctx)


def train(
    model: GPT,
    objective: Objective,
    params: TrainParams,
    *,
    checkpoint_dir: Path,
    report_dir: Path,
    desc: str,
    data_fingerprint: str = "",
) -> TrainResult:
    """Train ``model`` on ``objective``; resumes from the newest good checkpoint of the same run.

    ``data_fingerprint`` (e.g. the shards' fingerprint) joins the run key, so checkpoints of a run on
    other data are not resumed. Under torchrun every rank calls this; rank 0 writes checkpoints and logs.
    """
    owns_group = not torch.distributed.is_initialized()
    trainer = _Trainer(model, objective, params, checkpoint_dir, report_dir, desc, data_fingerprint)
    try:
        return trainer.run()
    finally:
        if owns_group:
            distributed.teardown()
