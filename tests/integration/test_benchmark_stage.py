"""The benchmark stage on the tiny project: `dvc repro benchmark` scores base, sft and dpo with the real
lm-evaluation-harness; the report page and `compare` show the scores and rank two real experiments by one; a Hub
task named in params runs from a local copy with its published reference row beside ours; a missing model is one
error line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from pipeline.orchestration import compare, dvc_ops, report
from tests.helpers.hub_copies import lambada_copy
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
        done = _run_stage(project)
        written = sorted(p.name for p in (project / "reports/benchmark").iterdir())
    finally:
        shutil.move(kept, project / "models/dpo")
        out.write_bytes(saved)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert done.stderr.startswith("error: models/dpo/config.json") and "dpo" in done.stderr
    assert "metrics.json" not in written  # nothing half-done: no metrics without every model


def test_a_hub_task_named_in_params_runs_from_its_copy_with_its_reference_row(project, tmp_path):
    params_file, out = project / "params.yaml", project / "reports/benchmark/metrics.json"
    saved_params, saved_metrics = params_file.read_text(), out.read_bytes()
    params = yaml.safe_load(saved_params)
    copy = lambada_copy(tmp_path / "lambada_openai")
    params["benchmark"] |= {
        "tasks": ["pipeline_cloze", "lambada_openai"],
        "limit": 4,
        "hub_copies": [{"repo": "EleutherAI/lambada_openai", "path": str(copy)}],
    }
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        done = _run_stage(project)
        metrics = json.loads(out.read_text())
        lines = report.stage_section(
            report.read_stage("benchmark", project / "reports/benchmark"), project / "reports"
        )
    finally:
        params_file.write_text(saved_params)
        out.write_bytes(saved_metrics)
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics["tasks"] == {"pipeline_cloze": 4, "lambada_openai": 4}
    assert all(m["lambada_openai"]["random_baseline"] == 0.0 for m in metrics["models"].values())
    reference = metrics["references"]["lambada_openai"]
    assert reference["metrics"]["acc"] == 0.3256 and reference["source"].startswith("https://github.com/")
    said = next(line for line in done.stderr.splitlines() if "lambada_openai acc" in line)
    assert "base " in said and "reference GPT-2 124M (openai-community/gpt2) 0.326" in said
    assert "| task | metric | base | sft | dpo | random guess | items | reference |" in lines
    assert next(line for line in lines if line.startswith("| lambada_openai | acc |")).endswith(
        "| 0 | 4 | 0.3256 ± 0.0065 |"
    )
    assert any(line.startswith("- reference for lambada_openai: GPT-2 124M") for line in lines)


def test_compare_ranks_two_real_experiments_by_a_benchmark_score(project, capsys):
    names = {"dpo-2-steps": 2, "dpo-6-steps": 6}
    for name, steps in names.items():
        dvc_ops.dvc(project, "exp", "run", "--name", name, "-S", f"dpo.max_steps={steps}", "benchmark")
    metric = "benchmark: models.dpo.pipeline_preference.acc_norm"
    argv = [*names, "--rank-by", "dpo.pipeline_preference.acc_norm", "--project", str(project)]
    assert compare.cli_compare(argv) == 0
    out = capsys.readouterr().out
    experiments = compare.select(compare.load_experiments(project), list(names))
    table = compare.rank(compare.comparison_table(experiments), metric)
    scores = list(table[metric])
    assert scores == sorted(scores, reverse=True) and list(table[f"rank by {metric}"])[0] == 1
    order = list(table.index)
    assert f"| | {' | '.join(order)} |" in out and f"| rank by {metric} |" in out
    assert f"| dpo.max_steps | {names[order[0]]} | {names[order[1]]} |" in out


def _run_stage(project) -> subprocess.CompletedProcess:
    """``python -m stages.benchmark`` in ``project``, as dvc.yaml runs it."""
    return subprocess.run(
        [sys.executable, "-m", "stages.benchmark"],
        cwd=project,
        capture_output=True,
        text=True,
        env=venv_env(),
    )
