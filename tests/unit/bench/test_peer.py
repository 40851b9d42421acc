"""bench.peer: a --nanogpt without train.py is one error line; time-to-loss reads the first evaluation at the target."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import peer
from pipeline.model.gpt import config_from_preset


def test_nanogpt_dir_without_train_py_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        peer.main(["--nanogpt", str(tmp_path)])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --nanogpt {tmp_path}: no train.py there"]


def test_crossing_time_is_the_training_seconds_up_to_the_first_evaluation_at_the_target():
    seconds = [1.0, 2.0, 3.0, 4.0]
    points = [(2, 7.5), (4, 6.9)]
    assert peer.crossing_time(seconds, points, 7.5) == 3.0
    assert peer.crossing_time(seconds, points, 7.0) == 10.0
    assert math.isinf(peer.crossing_time(seconds, points, 6.0))


def test_a_relative_nanogpt_path_runs_from_its_temp_working_directory(tmp_path, monkeypatch):
    """train.py runs with the temp dir as its cwd: a --nanogpt relative to ours must still be found there."""
    peer_dir = tmp_path / "peers" / "nanoGPT"
    peer_dir.mkdir(parents=True)
    (peer_dir / "configurator.py").write_text("")
    (peer_dir / "train.py").write_text(
        "import os, sys\n"
        "assert os.path.exists('configurator.py')\n"
        "for i in range(4):\n    print(f'iter {i}: loss 1.0, time {10 * (i + 1)}.0ms')\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = config_from_preset("cpu-tiny")
    seconds, ckpt = peer.run_nanogpt(Path("peers/nanoGPT"), work, cfg, batch=2, steps=3, warmup=1)
    assert seconds == [0.02, 0.03] and ckpt == work / "out" / "ckpt.pt"
