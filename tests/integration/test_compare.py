"""`compare` on two real DVC experiments of the tiny project, and `sweep` (queue + run + compare) on a trivial one."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from pipeline.common.errors import PipelineError
from pipeline.orchestration import compare, dvc_ops
from tests.helpers.project import make_project, run
from tests.helpers.trivial_project import make_trivial_project

pytestmark = pytest.mark.timeout(600)


def test_compare_two_real_experiments(tmp_path, capsys):
    project = make_project(tmp_path / "project")
    dvc_ops.require_experiment_files_tracked(project, dvc_ops.read_stages(project))
    for name, lr in (("lr-low", "0.0005"), ("lr-high", "0.003")):
        dvc_ops.dvc(project, "exp", "run", "--name", name, "-S", f"pretrain.lr={lr}", "evaluate")

    assert compare.cli_compare(["lr-low", "lr-high", "--project", str(project)]) == 0
    out = capsys.readouterr().out
    assert "| | lr-low | lr-high |" in out
    assert "| pretrain.lr | 0.0005 | 0.003 |" in out
    assert "| evaluate: bits_per_byte |" in out and "| pretrain: val.loss |" in out
    assert "dvc plots diff lr-low lr-high" in out
    assert "model.preset" not in out  # unchanged params stay out of the table

    table = pd.read_csv(project / "reports/compare/compare.csv", index_col="experiment")
    assert list(table.index) == ["lr-low", "lr-high"]
    assert table["evaluate: bits_per_byte"].notna().all()
    assert table.loc["lr-low", "evaluate: val_loss"] != table.loc["lr-high", "evaluate: val_loss"]
    png = project / "reports/compare/loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = compare.loss_curves(
        project,
        compare.select(compare.load_experiments(project), ["lr-low", "lr-high"]),
        ["reports/pretrain/plots/metrics"],
    )
    assert set(curves["pretrain: train/loss"]) == {"lr-low", "lr-high"}
    assert (project / "reports/compare/compare.md").read_text().startswith("# Experiment comparison")


def test_sweep_runs_a_grid_and_compares_it(tmp_path, capsys):
    project = make_trivial_project(tmp_path / "project")
    assert compare.sweep_variants(["train.lr=0.05,0.2", "train.steps=5"]) == [
        ["train.lr=0.05", "train.steps=5"],
        ["train.lr=0.2", "train.steps=5"],
    ]
    assert (
        compare.cli_sweep(["-S", "train.lr=0.05,0.2", "--name", "lr", "-j", "1", "--project", str(project)])
        == 0
    )
    out = capsys.readouterr().out
    assert "| | main | lr-1 | lr-2 |" in out
    assert "| train.lr | 0.1 | 0.05 | 0.2 |" in out
    table = pd.read_csv(project / "reports/compare/compare.csv", index_col="experiment")
    assert table.loc["lr-2", "train: val.loss"] < table.loc["lr-1", "train: val.loss"]

    with pytest.raises(PipelineError, match="experiment 'lr-1' already exists"):
        compare.cli_sweep(["-S", "train.lr=0.3", "--name", "lr", "--project", str(project)])
    with pytest.raises(PipelineError, match="no finished experiment 'nope'"):
        compare.cli_compare(["nope", "lr-1", "--project", str(project)])
    with pytest.raises(PipelineError, match="--jobs must be between 1 and"):
        compare.cli_sweep(["-S", "train.lr=0.3", "-j", "0", "--project", str(project)])


def test_failed_variant_is_reported(tmp_path):
    project = make_trivial_project(tmp_path / "project")
    with pytest.raises(PipelineError, match=r"experiment 'bad-1' failed: .*dvc queue logs bad-1"):
        compare.cli_sweep(["-S", "train.fail=true", "--name", "bad", "--project", str(project)])


def test_compare_on_a_fresh_clone_shows_what_it_can_and_names_the_rest(tmp_path, capsys):
    """The committed baseline's outputs were produced on another machine: they are in no cache here."""
    project = make_project(tmp_path / "project")
    dvc_ops.dvc(project, "repro", "evaluate")
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "baseline run"], project)
    shutil.rmtree(project / ".dvc" / "cache")  # what a fresh clone has of the baseline's cached outputs
    dvc_ops.dvc(project, "exp", "run", "--name", "t1", "-S", "pretrain.lr=0.002", "evaluate")

    assert compare.cli_compare(["--project", str(project)]) == 0
    out = capsys.readouterr().out
    assert "| | main | t1 |" in out and "| pretrain.lr | 0.001 | 0.002 |" in out
    assert "## Unavailable" in out and "make your own run the baseline" in out
    assert "- main: reports/pretrain/plots/metrics (not in this machine's DVC cache)" in out
    assert "t1: reports/pretrain" not in out  # the experiment's own outputs are here and compared

    names = [e.name for e in compare.load_experiments(project)]
    assert "workspace" in names and "workspa" not in names
    assert compare.cli_compare(["workspace", "t1", "--project", str(project)]) == 0
    assert "| | workspace | t1 |" in capsys.readouterr().out
