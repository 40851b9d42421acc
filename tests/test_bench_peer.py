"""bench.peer: a --nanogpt without train.py is one error line; time-to-loss reads the first evaluation at the target."""
from __future__ import annotations

import math

import pytest

from bench import peer


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
