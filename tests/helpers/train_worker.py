"""A training run in its own process (for the kill-and-resume and torchrun tests).

Trains a cpu-tiny GPT on a learnable synthetic sequence task through the real loop (with LoRA adapters,
merged at the end, when the params' ``lora.rank`` > 0), then writes the model
directory (rank 0) and every rank's weight digest. Tests crash it at a chosen checkpoint through
``resume.KILL_AFTER_CHECKPOINT``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.common.config import LoRAParams, TrainParams
from pipeline.model import lora
from pipeline.model.checkpoint import save_model
from pipeline.model.gpt import GPT, config_from_preset
from pipeline.train import resume
from pipeline.train.loop import Batch, train

ROOT = Path(__file__).resolve().parents[2]
VOCAB, CONTEXT = 64, 32


class CountingObjective:
    """Sequences that count upward modulo VOCAB from a random start: easy to learn, cheap to make."""

    def __init__(self, seed: int, batch_size: int, grad_accum: int = 1):
        self.seed, self.batch_size, self.grad_accum = seed, batch_size, grad_accum

    def _batch(self, generator: torch.Generator) -> Batch:
        start = torch.randint(0, VOCAB, (self.batch_size, 1), generator=generator)
        seq = (start + torch.arange(CONTEXT + 1)) % VOCAB
        return {"input_ids": seq[:, :-1], "targets": seq[:, 1:]}

    def train_batch(self, step: int, micro_step: int, rank: int, world_size: int) -> Batch:
        number = (
            step * self.grad_accum + micro_step
        ) * world_size + rank  # the run's n-th batch, as pretrain's
        key = self.seed * 1_000_003 + number  # so 2 ranks × 1 micro-step see what 1 rank × 2 micro-steps sees
        return self._batch(torch.Generator().manual_seed(key))

    def eval_batches(self):
        generator = torch.Generator().manual_seed(self.seed + 999)
        return [self._batch(generator) for _ in range(2)]

    def loss(self, model, batch):
        logits, _ = model(batch["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())
        accuracy = (logits.argmax(-1) == batch["targets"]).float().mean()
        return loss, {"accuracy": accuracy}

    def count_tokens(self, batch: Batch) -> int:
        return batch["targets"].numel()


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config_from_preset("cpu-tiny", vocab_size=VOCAB, context_length=CONTEXT))


def weights_digest(model: GPT) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", required=True, help="TrainParams fields as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fields = json.loads(args.params)
    params = TrainParams(
        **{
            **fields,
            "lora": LoRAParams(
                **{
                    **fields.get("lora", {}),
                    "targets": tuple(fields.get("lora", {}).get("targets", LoRAParams.targets)),
                }
            ),
        }
    )
    objective = CountingObjective(params.seed, params.batch_size, params.grad_accum)
    model = lora.apply_lora(tiny_model(), params.lora, "worker.lora", params.seed)  # rank 0: unchanged
    result = train(
        model,
        objective,
        params,
        checkpoint_dir=args.out / "checkpoints",
        report_dir=args.out / "report",
        desc="worker",
    )
    rank = int(os.environ.get("RANK", 0))
    if rank != 0 and params.parallel == "fsdp":  # FSDP gathers the whole model on rank 0 only
        return
    if lora.adapter_info(result.model) is not None:
        result.model = lora.merge(result.model)
    (args.out / f"digest_rank{rank}.txt").write_text(weights_digest(result.model))
    if rank == 0:
        save_model(args.out / "model", result.model)
        (args.out / "metrics.json").write_text(json.dumps(result.metrics))


def start(
    out: Path,
    params: TrainParams,
    launcher: list[str] | None = None,
    kill_after: int | None = None,
    kill_rank: int | None = None,
) -> subprocess.Popen:
    """This module in a child process (under ``launcher``, torchrun say), killed after ``kill_after`` checkpoints
    (only rank ``kill_rank``, when given)."""
    cmd = [
        *(launcher or [sys.executable]),
        "-m",
        "tests.helpers.train_worker",
        "--out",
        str(out),
        "--params",
        json.dumps(asdict(params)),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if kill_after is not None:
        env[resume.KILL_AFTER_CHECKPOINT] = str(kill_after)
    if kill_rank is not None:
        env[resume.KILL_RANK] = str(kill_rank)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


if __name__ == "__main__":
    main()
