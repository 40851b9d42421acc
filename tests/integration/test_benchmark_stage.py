"""The benchmark stage on the tiny project: `dvc repro benchmark` scores base, sft and dpo with the real
lm-evaluation-harness; the report page and `compare` show the scores; a missing model is one error line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from pipeline.orchestration import compare, report
from tests.helpers.project import make_project, run, venv_env

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("benchmark") / "project")
    run(["dvc", "repro", "benchmark"], root)
    return root


def test_every_model_is_scored_on_every_task(project):
    metrics = json.loads((project / "reports/benchmark/metrics.json").read_text())
    assert metrics["tasks"]["pipeline_cloze"] == 8  # benchmark.limit of the tiny params
    assert 1 <= metrics["tasks"]["pipeline_preference"] <= 8  # the DPO validation split of 60 pairs is small
    assert list(metrics["models"]) == ["base", "sft", "dpo"]
    for tasks in metrics["models"].values():
        cloze, preference = tasks["pipeline_cloze"], tasks["pipeline_preference"]
        assert cloze["n"] == 8 and cloze["random_baseline"] == 0.0 and cloze["perplexity"] > 1
        assert (
            preference["n"] == metrics["tasks"]["pipeline_preference"]
            and preference["random_baseline"] == 0.5
        )
        for row in (cloze, preference):
            assert 0 <= row["acc"] <= 1 and row["acc_stderr"] >= 0
        # acc counts the items whose chosen answer is likelier: a multiple of 1/n
        assert round(preference["acc"] * preference["n"], 6) == int(
            round(preference["acc"] * preference["n"])
        )
    timing = json.loads((project / "reports/benchmark/timing.json").read_text())
    assert timing["seconds"] < 120


def test_the_report_page_and_compare_show_the_scores(project):
    stage = report.read_stage("benchmark", project / "reports/benchmark")
    lines = report.stage_section(stage, project / "reports")
    assert "| task | metric | base | sft | dpo | random guess | items |" in lines
    acc = next(line for line in lines if line.startswith("| pipeline_preference | acc |"))
    assert " ± " in acc and "| 0.5 |" in acc
    row = {
        "benchmark: models.base.pipeline_cloze.acc": 0.1,
        "benchmark: models.dpo.pipeline_preference.acc": 0.6,
        "benchmark: models.dpo.pipeline_preference.acc_stderr": 0.1,
    }
    experiments = [
        compare.Experiment("a", "r1", "exp", {"pretrain.lr": 0.001}, row),
        compare.Experiment("b", "r2", "exp", {"pretrain.lr": 0.002}, {k: v / 2 for k, v in row.items()}),
    ]
    table = compare.comparison_table(experiments)
    assert "benchmark: models.dpo.pipeline_preference.acc" in table.columns
    assert "benchmark: models.dpo.pipeline_preference.acc_stderr" not in table.columns
    assert list(table["benchmark: models.base.pipeline_cloze.acc"]) == [0.1, 0.05]


def test_a_missing_model_is_one_error_line_and_no_metrics(project, tmp_path):
    out = project / "reports/benchmark/metrics.json"
    kept = tmp_path / "dpo"
    shutil.move(project / "models/dpo", kept)
    saved = out.read_bytes()
    out.unlink()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "stages.benchmark"],
            cwd=project,
            capture_output=True,
            text=True,
            env=venv_env(),
        )
        written = sorted(p.name for p in (project / "reports/benchmark").iterdir())
    finally:
        shutil.move(kept, project / "models/dpo")
        out.write_bytes(saved)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert done.stderr.startswith("error: models/dpo/config.json") and "dpo" in done.stderr
    assert "metrics.json" not in written  # nothing half-done: no metrics without every model
