"""FSDP under torchrun (gloo, CPU): the single-process losses, sharded checkpoints resumed into other world
sizes, a SIGKILLed worker brought back by torchrun's elastic restart, LoRA, and the fine-tuning stages."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.common.config import LoRAParams, TrainParams
from pipeline.model.checkpoint import load_model
from pipeline.train import resume, sharded
from tests.helpers.project import make_project, run
from tests.helpers.train_worker import finish, start

# 2 ranks × 2 micro-steps = 4 batches a step; one rank with 4 micro-steps sees the same 4 (train_worker's numbering)
PARAMS = TrainParams(
    batch_size=8,
    grad_accum=2,
    max_steps=12,
    warmup_steps=4,
    lr=3e-3,
    eval_every=6,
    eval_batches=2,
    checkpoint_every=6,
    keep_checkpoints=2,
    log_every=3,
    seed=5,
    dtype="fp32",  # the comparisons are at fp32 tolerance (bitwise where the world size is unchanged)
    parallel="fsdp",
)
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _torchrun(nproc: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *extra,
    ]


def _run(out: Path, nproc: int, params: TrainParams = PARAMS, **kw) -> None:
    finish(start(out, params, launcher=_torchrun(nproc) if nproc > 1 else None, **kw), timeout=240)


def _losses(out: Path) -> list[float]:
    """The logged train loss of each log window (dvclive's tsv, re-emitted whole by a resumed run)."""
    rows = (out / "report/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    return [float(row.split("\t")[1]) for row in rows]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_model(out / "model")[0].state_dict()


def _assert_close(out: Path, reference: Path) -> None:
    assert _losses(out) == pytest.approx(_losses(reference), rel=TOLERANCE["rtol"])
    for name, tensor in _weights(reference).items():
        torch.testing.assert_close(_weights(out)[name], tensor, **TOLERANCE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Two FSDP processes, uninterrupted."""
    out = tmp_path_factory.mktemp("fsdp2")
    _run(out, 2)
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """Two FSDP processes, both SIGKILLed right after the sharded checkpoint of step 6."""
    out = tmp_path_factory.mktemp("killed")
    proc = start(out, PARAMS, launcher=_torchrun(2), kill_after=6)
    proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert [p.name for p in resume.list_checkpoints(out / "checkpoints")] == ["step_00000006"]
    return out


def test_fsdp_on_two_processes_follows_the_single_process_run(reference, tmp_path):
    single = replace(PARAMS, grad_accum=4)
    _run(tmp_path, 1, single)
    _assert_close(reference, tmp_path)
    shards = sorted(p.name for p in (reference / "checkpoints/step_00000012/shards").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # every rank wrote its own shard


@pytest.mark.parametrize("nproc", [1, 4])
def test_a_sharded_checkpoint_resumes_into_another_world_size(reference, killed, nproc, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    _run(out, nproc)
    _assert_close(out, reference)


def test_a_sigkilled_worker_is_restarted_by_torchrun_and_ends_with_the_same_weights(reference, tmp_path):
    launcher = _torchrun(2, "--max_restarts=1")
    proc = start(tmp_path, PARAMS, launcher=launcher, kill_after=6, kill_rank=1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming from" in err and "step_00000006" in err
    assert (tmp_path / "digest_rank0.txt").read_text() == (reference / "digest_rank0.txt").read_text()


def test_lora_under_fsdp_trains_only_the_adapters_as_one_process_does(tmp_path):
    lora = replace(PARAMS, max_steps=6, lora=LoRAParams(rank=4, alpha=8.0))
    _run(tmp_path / "fsdp", 2, lora)
    _run(tmp_path / "single", 1, replace(lora, grad_accum=4))
    _assert_close(tmp_path / "fsdp", tmp_path / "single")
    metadata = sharded.SafeReader(tmp_path / "fsdp/checkpoints/step_00000006/shards").read_metadata()
    moments = [k for k in metadata.state_dict_metadata if k.startswith("optim.state.")]
    assert moments and all(".lora." in k for k in moments), "optimizer state for the adapters only"


def test_sft_dpo_and_classify_run_under_fsdp_with_two_processes(tmp_path):
    fsdp = {"nproc_per_node": 2, "parallel": "fsdp", "dtype": "fp32"}
    root = make_project(tmp_path / "project", {"sft": fsdp, "dpo": fsdp, "classify": fsdp})
    run([sys.executable, "-m", "dvc", "repro", "sft", "dpo", "classify"], root)
    for stage in ("sft", "dpo", "classify"):
        newest = resume.list_checkpoints(root / "checkpoints" / stage)[0]
        assert sorted(p.name for p in (newest / "shards").glob("*.distcp")) == [
            "__0_0.distcp",
            "__1_0.distcp",
        ]
    for model in ("sft", "dpo", "classifier"):
        assert (root / "models" / model / "model.safetensors").is_file()  # one file, gathered on rank 0
