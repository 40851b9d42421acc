"""The real dvc.yaml end to end: the Prefect flow runs every stage once, and an edit reruns exactly its importers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.orchestration import flow
from tests.helpers.dag import code_deps
from tests.helpers.project import make_project, run

MODEL_STAGES = {"pretrain", "evaluate", "sft", "dpo", "export"}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, prefect_harness) -> Path:
    """A tiny-params copy of the project whose whole pipeline the Prefect flow has run once."""
    project = make_project(tmp_path_factory.mktemp("dag") / "project")
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    assert flow.pipeline_flow(project=str(project)) == {name: "ran" for name in stages}
    assert flow.pipeline_flow(project=str(project)) == {name: "skipped" for name in stages}
    return project


def changed_stages(project: Path) -> set[str]:
    status = json.loads(run(["dvc", "status", "--json"], project).stdout or "{}")
    return {name.split(":")[-1] for name in status}


@pytest.mark.parametrize(
    "module", ["pipeline/train/objectives.py", "pipeline/model/gpt.py", "pipeline/common/config.py"]
)
def test_editing_a_module_reruns_exactly_the_stages_that_import_it(reproduced, module):
    path = reproduced / module
    original = path.read_text(encoding="utf-8")
    stages = yaml.safe_load((reproduced / "dvc.yaml").read_text())["stages"]
    importers = {name for name in stages if module in code_deps(f"stages/{name}.py")}
    try:
        path.write_text(original + "# an edit\n", encoding="utf-8")
        assert changed_stages(reproduced) == importers
    finally:
        path.write_text(original, encoding="utf-8")
    assert changed_stages(reproduced) == set()
    if module == "pipeline/train/objectives.py":
        assert {"sft", "dpo"} <= importers
    if module == "pipeline/model/gpt.py":
        assert MODEL_STAGES <= importers
    if module == "pipeline/common/config.py":
        assert importers == set(stages)


def test_the_run_ends_with_its_report_page_and_a_second_repro_does_nothing(reproduced):
    text = (reproduced / "reports/README.md").read_text(encoding="utf-8")
    for stage in ("download", "tokenize", "pretrain", "evaluate", "sft", "dpo", "judge", "export"):
        seconds = json.loads((reproduced / "reports" / stage / "timing.json").read_text())["seconds"]
        assert f"| {stage} | {seconds:g} |" in text  # every stage timed itself; the page lists it
    assert (
        "parity.max_abs_logit_diff" in text
        and "unigram baseline" in text
        and "## Answers to held-out" in text
    )
    assert "fallback scorer rouge-l-fallback" in text  # the tiny params point the judge at a closed port
    assert "data:image/png;base64," in (reproduced / "reports/index.html").read_text(encoding="utf-8")
    again = run(["dvc", "repro"], reproduced)
    assert "Running stage" not in again.stdout and "Data and pipelines are up to date." in again.stdout
