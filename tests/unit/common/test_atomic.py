"""Atomic outputs: one path or several published together, and the leftovers of a killed writer removed."""

from __future__ import annotations

import pytest

from pipeline.common.atomic import atomic_path, atomic_paths


def test_a_failed_block_publishes_nothing_and_leaves_nothing(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out") as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("the check failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


def test_a_killed_writers_temp_directory_is_removed_by_the_next_write(tmp_path):
    stale = tmp_path / ".gguf.tmp-k1ll3d"  # what SIGKILL leaves: the finally never ran
    (stale / "gguf").mkdir(parents=True)
    (stale / "gguf/dpo-q8_0.gguf").write_bytes(b"\0" * 1024)
    (tmp_path / ".gguf-other.tmp-x").mkdir()  # another output's temp directory is not this one's to remove
    with atomic_path(tmp_path / "gguf") as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gguf-other.tmp-x", "gguf"]


def test_several_outputs_are_published_together_or_not_at_all(tmp_path):
    with atomic_paths(tmp_path / "a", tmp_path / "b.json") as (a, b):
        a.mkdir()
        b.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.json"]
    with pytest.raises(ValueError), atomic_paths(tmp_path / "a", tmp_path / "c") as (a, c):
        a.mkdir()
        (a / "replaced.txt").write_text("")
        raise ValueError("the second output failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.json"]
    assert list((tmp_path / "a").iterdir()) == []
