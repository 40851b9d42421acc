"""``parallel: fsdp`` in one process: the same weights as ddp, sharded (DCP) checkpoints, and a reader that
refuses metadata naming anything but DCP's own records (the multi-process runs: tests/integration/test_sharded.py)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.common.config import TrainParams
from pipeline.train import resume
from pipeline.train.loop import train
from tests.helpers.train_worker import CountingObjective, tiny_model, weights_digest

PARAMS = TrainParams(
    batch_size=8,
    max_steps=6,
    warmup_steps=2,
    lr=3e-3,
    eval_every=6,
    eval_batches=2,
    checkpoint_every=3,
    log_every=3,
    seed=5,
    dtype="fp32",
    parallel="fsdp",
)


def _train(params: TrainParams, out: Path, desc: str = "sharded"):
    return train(
        tiny_model(),
        CountingObjective(params.seed, params.batch_size),
        params,
        checkpoint_dir=out / "ckpt",
        report_dir=out / "report",
        desc=desc,
    )


class _Mkdir:
    """A pickle that would create a directory when loaded: what a forged checkpoint could run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _forge(checkpoint: Path, name: str, data: bytes) -> None:
    """Replace ``name`` in ``checkpoint`` and record its new sha256, as a forger would."""
    (checkpoint / name).write_bytes(data)
    state = json.loads((checkpoint / resume.STATE).read_text())
    state["files"][name] = hashlib.sha256(data).hexdigest()
    (checkpoint / resume.STATE).write_text(json.dumps(state))


def test_fsdp_in_one_process_trains_as_ddp_and_writes_shards(tmp_path):
    sharded = _train(PARAMS, tmp_path / "fsdp")
    plain = _train(replace(PARAMS, parallel="ddp"), tmp_path / "ddp")
    assert weights_digest(sharded.model) == weights_digest(plain.model)
    checkpoint = tmp_path / "fsdp/ckpt/step_00000006"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["shards", "state.json", "trainer.pt"]
    assert "optimizer" not in json.dumps(json.loads((checkpoint / "state.json").read_text())["files"])


def test_a_resumed_sharded_run_ends_with_the_uninterrupted_weights(tmp_path, caplog):
    straight = _train(PARAMS, tmp_path)
    shutil.rmtree(tmp_path / "ckpt/step_00000006")  # as if killed between the two checkpoints
    with caplog.at_level("WARNING"):
        resumed = _train(PARAMS, tmp_path, desc="resumed")
    assert any("resuming from" in r.message and "step_00000003" in r.message for r in caplog.records)
    assert weights_digest(resumed.model) == weights_digest(straight.model)


def test_metadata_naming_code_is_refused_and_never_run(tmp_path):
    _train(PARAMS, tmp_path)
    marker = tmp_path / "ran"
    for step in ("step_00000003", "step_00000006"):
        _forge(tmp_path / "ckpt" / step, "shards/.metadata", pickle.dumps(_Mkdir(marker)))
    with pytest.raises(
        resume.CorruptCheckpoint, match=r"no usable checkpoint.*mkdir, which is not allowed"
    ) as info:
        _train(PARAMS, tmp_path)
    assert not marker.exists()
    assert "\n" not in str(info.value)


def test_a_damaged_shard_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    _train(PARAMS, tmp_path)
    shard = tmp_path / "ckpt/step_00000006/shards/__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        _train(PARAMS, tmp_path)
    assert any("__0_0.distcp: contents do not match" in r.message for r in caplog.records)
    assert any("resuming from" in r.message and "step_00000003" in r.message for r in caplog.records)
