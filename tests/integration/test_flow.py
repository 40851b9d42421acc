"""The Prefect flow on real DVC projects: task states, skip-unchanged, failures, retries, experiments, remotes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.common.errors import PipelineError
from pipeline.orchestration import dvc_ops, flow
from tests.helpers.project import make_project
from tests.helpers.trivial_project import make_trivial_project

STAGES = {"download", "train", "report"}  # the trivial project's stages


@pytest.fixture
def project(tmp_path) -> Path:
    return make_trivial_project(tmp_path / "project")


def task_runs(flow_run_id, expected: set[str]) -> dict[str, object]:
    """{task run name: task run} of one flow run, once every expected task run has a final state.

    The server records task-run states from events, asynchronously: read right after the flow returns, a
    task run can still have no state. So this drains the client's events and waits for that condition.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            by_name = {run.name: run for run in runs}
            recorded = {
                name for name, run in by_name.items() if run.state is not None and run.state.is_final()
            }
            if expected <= recorded:
                return by_name
            assert time.monotonic() < deadline, (
                f"task runs {sorted(expected - recorded)} never reached a final state"
            )
            time.sleep(0.1)


def run_artifacts(flow_run_id, key: str = flow.ARTIFACT_KEY) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                key=ArtifactFilterKey(any_=[key]),
            )
        )
    return [artifact.data for artifact in artifacts]


def run_artifact(flow_run_id) -> str:
    artifacts = run_artifacts(flow_run_id)
    assert len(artifacts) == 1
    return artifacts[0]


def set_params(project: Path, section: str, **values) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_stages_come_from_dvc_yaml_in_order(project):
    stages = dvc_ops.read_stages(project)
    assert [s.name for s in stages] == ["download", "train", "report"]
    train = stages[1]
    assert train.upstream == ("download",)
    assert train.metrics == ("reports/train/metrics.json",)
    assert train.plots == ("reports/train/plots/metrics",)
    assert stages[2].reports == ("reports/report/report.md",)
    assert [s.name for s in dvc_ops.select_stages(stages, ["report", "download"])] == ["download", "report"]
    with pytest.raises(PipelineError, match="no stage 'evaluate'"):
        dvc_ops.select_stages(stages, ["evaluate"])


def test_first_run_runs_every_stage_second_run_skips_them(prefect_harness, project):
    state = flow.pipeline_flow(project=str(project), return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {"download": "ran", "train": "ran", "report": "ran"}
    runs = task_runs(state.state_details.flow_run_id, STAGES)
    assert sorted(runs) == ["download", "report", "train"]
    assert all(run.state.is_completed() for run in runs.values())
    report = run_artifact(state.state_details.flow_run_id)
    metrics = json.loads((project / "reports/train/metrics.json").read_text())
    assert f"| reports/train/metrics.json | val.loss | {metrics['val']['loss']:.6g} |" in report
    assert "| train | ran |" in report
    assert str(project / "reports/report/report.md") in report

    again = flow.pipeline_flow(project=str(project), return_state=True)
    assert again.result() == {"download": "skipped", "train": "skipped", "report": "skipped"}
    assert all(
        run.state.is_completed() for run in task_runs(again.state_details.flow_run_id, STAGES).values()
    )

    set_params(project, "train", lr=0.2)
    assert flow.pipeline_flow(project=str(project)) == {
        "download": "skipped",
        "train": "ran",
        "report": "ran",
    }
    forced = flow.pipeline_flow(stages=["download"], force=True, project=str(project))
    assert forced == {"download": "ran"}


def test_the_report_page_is_published_with_its_plots_inlined(prefect_harness, project):
    first = flow.pipeline_flow(project=str(project), return_state=True)
    assert first.result()["report"] == "ran"
    assert (
        run_artifacts(first.state_details.flow_run_id, flow.REPORT_ARTIFACT_KEY) == []
    )  # this report stage writes no page
    (project / "reports/train/curve.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (project / flow.REPORT_MARKDOWN).write_text(
        "# Run report\n\n![curve](train/curve.png)\n"
    )  # as stages/report.py writes it
    again = flow.pipeline_flow(project=str(project), return_state=True)
    assert again.result()["report"] == "skipped"
    published = run_artifacts(again.state_details.flow_run_id, flow.REPORT_ARTIFACT_KEY)
    assert published == ["# Run report\n\n![curve](data:image/png;base64,iVBORw0KGgo=)\n"]
    partial = flow.pipeline_flow(
        stages=["train"], project=str(project), return_state=True
    )  # no report stage run
    assert run_artifacts(partial.state_details.flow_run_id, flow.REPORT_ARTIFACT_KEY) == []


def test_failing_stage_fails_the_run_with_the_stage_error(prefect_harness, project):
    set_params(project, "train", fail=True)
    state = flow.pipeline_flow(project=str(project), return_state=True)
    assert state.is_failed()
    assert "stage 'train' failed: error: params.yaml: train.fail is true" in state.message
    runs = task_runs(state.state_details.flow_run_id, {"download", "train"})
    assert runs["download"].state.is_completed()
    assert runs["train"].state.is_failed()
    assert "error: params.yaml: train.fail is true" in runs["train"].state.message
    assert "report" not in runs
    assert "**Failed:** stage 'train' failed" in run_artifact(state.state_details.flow_run_id)


def test_network_stage_is_retried(prefect_harness, project, monkeypatch):
    monkeypatch.setattr(flow, "RETRY_DELAY_S", 0)
    (project / ".flaky").touch()  # the download fails once with a transient error
    state = flow.pipeline_flow(stages=["download"], project=str(project), return_state=True)
    assert state.is_completed(), state.message
    download = task_runs(state.state_details.flow_run_id, {"download"})["download"]
    assert download.run_count == 2
    assert (project / "data/raw.txt").is_file()


def test_param_overrides_run_as_a_dvc_experiment(prefect_harness, project):
    flow.pipeline_flow(project=str(project))
    result = flow.pipeline_flow(overrides=["train.lr=0.5"], experiment="lr-05", project=str(project))
    assert result == {"download": "skipped", "train": "ran", "report": "ran"}
    shown = json.loads(dvc_ops.dvc(project, "exp", "show", "--json").stdout)
    experiments = {e["name"]: e["revs"][0]["data"] for e in shown[1]["experiments"]}
    exp = experiments["lr-05"]
    assert exp["params"]["params.yaml"]["data"]["train"]["lr"] == 0.5
    saved = exp["metrics"]["reports/train/metrics.json"]["data"]
    assert saved == json.loads((project / "reports/train/metrics.json").read_text())
    with pytest.raises(PipelineError, match="experiment 'lr-05' already exists"):
        flow.pipeline_flow(overrides=["train.lr=0.6"], experiment="lr-05", project=str(project))


def test_bad_override_names_the_key(prefect_harness, project):
    state = flow.pipeline_flow(overrides=["train.nope=1"], project=str(project), return_state=True)
    assert state.is_failed()
    assert "params.yaml: cannot apply train.nope=1" in state.message


def test_experiment_refuses_git_ignored_metrics(prefect_harness, project):
    (project / ".gitignore").write_text("/reports/\n")
    with pytest.raises(PipelineError, match="reports/train/metrics.json is git-ignored"):
        flow.pipeline_flow(overrides=["train.lr=0.5"], project=str(project))


def test_dvc_remote_lets_another_clone_reuse_results(prefect_harness, project, tmp_path):
    remote = tmp_path / "dvc-remote"
    dvc_ops.dvc(project, "remote", "add", "-d", "shared", str(remote))
    flow.pipeline_flow(dvc_remote=True, project=str(project))
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "results"], cwd=project, check=True)

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    result = flow.pipeline_flow(dvc_remote=True, project=str(clone))
    assert "ran" not in result.values(), result
    assert (clone / "models/model.txt").read_text() == (project / "models/model.txt").read_text()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_flow_launches_a_two_process_pretrain(prefect_harness, tmp_path, parallel):
    project = make_project(tmp_path / parallel, {"pretrain": {"nproc_per_node": 2, "parallel": parallel}})
    result = flow.pipeline_flow(stages=["download", "tokenize", "pretrain"], project=str(project))
    assert result == {"download": "ran", "tokenize": "ran", "pretrain": "ran"}
    checkpoints = sorted((project / "checkpoints/pretrain").glob("step_*"))
    assert json.loads((checkpoints[-1] / "state.json").read_text())["data_position"]["world_size"] == 2
    assert (checkpoints[-1] / "shards").is_dir() == (parallel == "fsdp")  # each rank wrote its shard
    assert (project / "models/base/model.safetensors").is_file()  # one file, gathered on rank 0


def test_cli_runs_the_flow_and_reports_failures(prefect_harness, project, capsys):
    assert flow.cli(["run", "--stages", "download,train", "--project", str(project)]) == 0
    out = capsys.readouterr().out
    assert "download     ran" in out and "train        ran" in out and "report" not in out
    with pytest.raises(PipelineError, match="no stage 'nope'"):
        flow.cli(["run", "--stages", "nope", "--project", str(project)])
    set_params(project, "train", fail=True)
    with pytest.raises(PipelineError, match="stage 'train' failed: error: params.yaml: train.fail is true"):
        flow.cli(["run", "--project", str(project)])


def test_module_entry_point(project):
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "flow", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "serve" in done.stdout
