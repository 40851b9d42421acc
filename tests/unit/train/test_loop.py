"""The one training loop: schedule, exact resume after SIGKILL, corrupt checkpoints, DDP under torchrun."""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from pipeline.common.config import TrainParams
from pipeline.common.errors import PipelineError
from pipeline.model.checkpoint import load_model
from pipeline.train import resume
from pipeline.train.loop import lr_factor, train
from tests.helpers.train_worker import CountingObjective, tiny_model, weights_digest
from tests.helpers.train_worker import finish as _finish
from tests.helpers.train_worker import start as _worker

ROOT = Path(__file__).resolve().parents[3]

PARAMS = TrainParams(
    batch_size=8,
    max_steps=24,
    warmup_steps=4,
    lr=3e-3,
    eval_every=12,
    eval_batches=2,
    checkpoint_every=6,
    keep_checkpoints=2,
    log_every=3,
    seed=5,
)


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    factors = [lr_factor(s, warmup_steps=10, max_steps=110, min_lr_ratio=0.1) for s in range(111)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert lr_factor(500, 10, 110, 0.1) == pytest.approx(0.1)  # past the end: stays on the floor
    assert lr_factor(0, 0, 100, 0.0) == pytest.approx(1.0)  # no warmup starts at the peak
    assert lr_factor(3, 5, 5, 0.1) == pytest.approx(4 / 5)  # warmup only


@pytest.mark.integration  # trains for ~20 s
def test_muon_trains_the_counting_task_as_well(tmp_path):
    params = TrainParams(**{**asdict(PARAMS), "optimizer": "muon", "dtype": "fp32"})
    result = train(
        tiny_model(),
        CountingObjective(params.seed, params.batch_size),
        params,
        checkpoint_dir=tmp_path / "ckpt",
        report_dir=tmp_path / "report",
        desc="muon",
    )
    assert result.metrics["val/loss"] < math.log(64) * 0.6


@pytest.mark.integration  # trains for ~20 s
def test_training_learns_and_logs_dvclive_metrics(tmp_path):
    params = PARAMS
    result = train(
        tiny_model(),
        CountingObjective(params.seed, params.batch_size),
        params,
        checkpoint_dir=tmp_path / "ckpt",
        report_dir=tmp_path / "report",
        desc="test",
    )
    assert result.metrics["step"] == params.max_steps
    assert result.metrics["val/loss"] < math.log(64) * 0.6  # well below chance on the counting task
    summary = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert summary["step"] == params.max_steps and summary["val"]["loss"] == pytest.approx(
        result.metrics["val/loss"]
    )
    assert 0 < summary["summary"]["mfu"] < 1
    rows = (tmp_path / "report" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tloss" and [int(r.split("\t")[0]) for r in rows[1:]] == list(range(3, 25, 3))
    lrs = [
        float(r.split("\t")[1])
        for r in (tmp_path / "report" / "plots" / "metrics" / "train" / "lr.tsv").read_text().splitlines()[1:]
    ]
    assert lrs[0] == pytest.approx(params.lr * 3 / 4)  # step 3 (0-based 2) is in the warmup
    assert lrs[-1] == pytest.approx(params.lr * lr_factor(23, 4, 24, params.min_lr_ratio))
    kept = [p.name for p in resume.list_checkpoints(tmp_path / "ckpt")]
    assert kept == ["step_00000024", "step_00000018"]  # keep_checkpoints=2, newest first


@pytest.mark.integration  # training processes, killed and resumed
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sigkilled_run_resumes_to_bitwise_identical_weights(tmp_path, optimizer):
    params = TrainParams(**{**asdict(PARAMS), "optimizer": optimizer})
    straight = _worker(tmp_path / "straight", params)
    killed = _worker(tmp_path / "killed", params, kill_after=PARAMS.checkpoint_every)
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    steps = [int(p.name.split("_")[1]) for p in resume.list_checkpoints(tmp_path / "killed" / "checkpoints")]
    assert steps == [PARAMS.checkpoint_every], (
        "killed right after the first checkpoint, so it is the only one"
    )

    _finish(straight)
    resumed = _worker(tmp_path / "killed", params)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in err
    digest = (tmp_path / "killed" / "digest_rank0.txt").read_text()
    assert digest == (tmp_path / "straight" / "digest_rank0.txt").read_text()
    # The resumed run re-emits the history it inherited: the curve has every logged step once.
    rows = (
        (tmp_path / "killed" / "report" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    )
    assert [int(r.split("\t")[0]) for r in rows[1:]] == list(range(3, 25, 3))


@pytest.mark.integration  # trains for ~25 s
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    half = TrainParams(**{**asdict(PARAMS), "keep_checkpoints": 3})
    train(
        tiny_model(),
        CountingObjective(half.seed, half.batch_size),
        half,
        checkpoint_dir=ckpt,
        report_dir=tmp_path / "r1",
        desc="full",
    )
    reference = weights_digest(load_model(ckpt / "step_00000024" / "model")[0])
    # Corrupt the newest checkpoint (a flipped byte in the weights), then resume: step 18 is used instead.
    weights = ckpt / "step_00000024" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        result = train(
            tiny_model(),
            CountingObjective(half.seed, half.batch_size),
            half,
            checkpoint_dir=ckpt,
            report_dir=tmp_path / "r2",
            desc="resume",
        )
    assert any("corrupt checkpoint" in r.message and "step_00000024" in r.message for r in caplog.records)
    assert any("resuming from" in r.message and "step_00000018" in r.message for r in caplog.records)
    assert weights_digest(result.model) == reference


@pytest.mark.integration  # trains
def test_only_corrupt_checkpoints_is_a_one_line_error(tmp_path):
    ckpt = tmp_path / "ckpt"
    params = TrainParams(**{**asdict(PARAMS), "max_steps": 6})
    train(
        tiny_model(),
        CountingObjective(params.seed, params.batch_size),
        params,
        checkpoint_dir=ckpt,
        report_dir=tmp_path / "r1",
        desc="first",
    )
    (ckpt / "step_00000006" / "state.json").write_text("{not json")
    with pytest.raises(resume.CorruptCheckpoint, match=r"step_00000006.*state\.json") as info:
        train(
            tiny_model(),
            CountingObjective(params.seed, params.batch_size),
            params,
            checkpoint_dir=ckpt,
            report_dir=tmp_path / "r2",
            desc="second",
        )
    assert "\n" not in str(info.value)


@pytest.mark.integration  # trains
def test_checkpoints_of_another_run_are_not_resumed(tmp_path):
    ckpt = tmp_path / "ckpt"
    params = TrainParams(**{**asdict(PARAMS), "max_steps": 6})
    train(
        tiny_model(),
        CountingObjective(params.seed, params.batch_size),
        params,
        checkpoint_dir=ckpt,
        report_dir=tmp_path / "r1",
        desc="first",
    )
    other = TrainParams(**{**asdict(params), "lr": 1e-3})
    fresh = train(
        tiny_model(),
        CountingObjective(other.seed, other.batch_size),
        other,
        checkpoint_dir=tmp_path / "fresh",
        report_dir=tmp_path / "r2",
        desc="fresh",
    )
    again = train(
        tiny_model(),
        CountingObjective(other.seed, other.batch_size),
        other,
        checkpoint_dir=ckpt,
        report_dir=tmp_path / "r3",
        desc="other",
    )
    assert weights_digest(again.model) == weights_digest(fresh.model)
    assert [p.name for p in resume.list_checkpoints(ckpt)] == ["step_00000006"]  # the stale one was replaced
    assert json.loads((ckpt / "step_00000006" / "state.json").read_text())["run_key"] != ""


@pytest.mark.integration  # torchrun, two processes
def test_ddp_with_two_cpu_processes_under_torchrun(tmp_path):
    params = TrainParams(**{**asdict(PARAMS), "max_steps": 12, "grad_accum": 2, "eval_every": 6})
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _finish(_worker(tmp_path, params, launcher=launcher), timeout=180)
    digests = {(tmp_path / f"digest_rank{r}.txt").read_text() for r in (0, 1)}
    assert len(digests) == 1, "DDP ranks must end with identical weights"
    model, _ = load_model(tmp_path / "model")
    assert weights_digest(model) == digests.pop()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val/loss"] < math.log(64)
    # 2 ranks × 2 micro-steps × 8 sequences × 32 tokens per step.
    assert metrics["train/tokens_seen"] == 12 * 2 * 2 * 8 * 32
    state = json.loads((tmp_path / "checkpoints" / "step_00000012" / "state.json").read_text())
    assert state["data_position"]["world_size"] == 2
    rng = torch.load(tmp_path / "checkpoints" / "step_00000012" / "trainer.pt", weights_only=True)["rng"][
        "torch"
    ]
    assert len(rng) == 2 and not torch.equal(rng[0], rng[1]), "each rank's own RNG state is kept"


def test_rerunning_a_finished_run_keeps_its_metrics_and_removes_interrupted_writes(tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    params = TrainParams(**{**asdict(PARAMS), "max_steps": 6})
    train(
        tiny_model(),
        CountingObjective(params.seed, params.batch_size),
        params,
        checkpoint_dir=ckpt,
        report_dir=tmp_path / "report",
        desc="first",
    )
    first = json.loads((tmp_path / "report" / "metrics.json").read_text())
    # What a kill during a checkpoint write leaves: atomic_path's hidden temp directory, half full.
    leftover = ckpt / ".step_00000009.abc123" / "step_00000009"
    leftover.mkdir(parents=True)
    (leftover / "trainer.pt").write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        train(
            tiny_model(),
            CountingObjective(params.seed, params.batch_size),
            params,
            checkpoint_dir=ckpt,
            report_dir=tmp_path / "report",
            desc="again",
        )
    assert not leftover.parent.exists()
    assert any(
        "interrupted checkpoint write" in r.message and ".step_00000009.abc123" in r.message
        for r in caplog.records
    )
    again = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert again.keys() == first.keys() and again["summary"] == first["summary"]


def _train_tiny(tmp_path: Path, name: str, **overrides):
    params = TrainParams(
        **{**asdict(PARAMS), "max_steps": 6, "eval_every": 6, "checkpoint_every": 6, **overrides}
    )
    return train(
        tiny_model(),
        CountingObjective(params.seed, params.batch_size),
        params,
        checkpoint_dir=tmp_path / name / "ckpt",
        report_dir=tmp_path / name / "report",
        desc=name,
    )


@pytest.mark.integration  # torch.compile: a minute
def test_compile_trains_forward_and_loss_as_one_graph_to_the_eager_result(tmp_path):
    eager = _train_tiny(tmp_path, "eager", dtype="fp32")
    compiled = _train_tiny(tmp_path, "compiled", dtype="fp32", compile=True)
    assert compiled.metrics["val/loss"] == pytest.approx(eager.metrics["val/loss"], rel=1e-4)
    for (name, a), (_, b) in zip(
        eager.model.state_dict().items(), compiled.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3, msg=name)  # fused kernels round differently


@pytest.mark.integration  # trains twice
def test_a_compiler_failure_falls_back_to_eager_with_the_same_weights(tmp_path, monkeypatch, caplog):
    def broken_compile(fn):
        def fails(*args, **kwargs):
            raise RuntimeError("inductor: no C++ compiler found\nlong traceback")

        return fails

    eager = _train_tiny(tmp_path, "eager")
    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING):
        fallback = _train_tiny(tmp_path, "fallback", compile=True)
    assert any(
        "torch.compile failed (RuntimeError: inductor: no C++ compiler found); training eagerly" in r.message
        for r in caplog.records
    )
    assert weights_digest(fallback.model) == weights_digest(eager.model)


class ScriptedValidation(CountingObjective):
    """The counting task whose validation loss is scripted, one value per evaluation: the best step is known."""

    def __init__(self, seed: int, batch_size: int, val_losses: list[float]):
        super().__init__(seed, batch_size)
        self.val_losses, self.evaluations = val_losses, 0

    def eval_batches(self):
        self.evaluations += 1
        return super().eval_batches()

    def loss(self, model, batch):
        loss, extras = super().loss(model, batch)
        if model.training:
            return loss, extras
        return loss * 0 + self.val_losses[self.evaluations - 1], extras


def test_keep_best_loss_returns_the_weights_of_the_lowest_validation_loss(tmp_path):
    params = TrainParams(
        **{**asdict(PARAMS), "max_steps": 6, "eval_every": 2, "checkpoint_every": 2, "keep_checkpoints": 3}
    )
    objective = ScriptedValidation(params.seed, params.batch_size, [3.0, 1.0, 2.0])  # steps 2, 4, 6
    best = train(
        tiny_model(),
        objective,
        TrainParams(**{**asdict(params), "keep": "best_loss"}),
        checkpoint_dir=tmp_path / "ckpt",
        report_dir=tmp_path / "report",
        desc="best",
    )
    assert best.metrics["summary/best_step"] == 4 and best.metrics["summary/best_loss"] == 1.0
    at_step_4, _ = load_model(resume.checkpoint_path(tmp_path / "ckpt", 4) / resume.MODEL_DIR)
    assert weights_digest(best.model) == weights_digest(at_step_4)
    last = _train_tiny(tmp_path, "last", max_steps=6, eval_every=2)
    assert weights_digest(last.model) != weights_digest(best.model)  # keep: last, the default


class NoAccuracy(CountingObjective):
    def loss(self, model, batch):
        return super().loss(model, batch)[0], {}


def test_keep_best_accuracy_without_a_validation_accuracy_is_one_error_naming_it(tmp_path):
    params = TrainParams(**{**asdict(PARAMS), "max_steps": 2, "eval_every": 2, "keep": "best_accuracy"})
    with pytest.raises(
        PipelineError, match="keep: best_accuracy, but its validation reports no val/accuracy"
    ):
        train(
            tiny_model(),
            NoAccuracy(params.seed, params.batch_size),
            params,
            checkpoint_dir=tmp_path / "ckpt",
            report_dir=tmp_path / "report",
            desc="sft",
        )
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())  # no checkpoint left
