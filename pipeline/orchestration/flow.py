"""The Prefect flow: the DVC pipeline with retries, logs, run history, an artifact per run and schedules.

One task per dvc.yaml stage, in dvc.yaml order; each task reproduces its stage through DVC, so an
unchanged stage is skipped (DVC, not Prefect, decides) and the graph has one source of truth.
Param overrides run the same stages as a DVC experiment (`dvc exp run -S` grammar, saved with
`dvc exp save`), so `dvc exp show` and `python -m pipeline compare` see it.

    python -m pipeline flow run [--stages a,b] [-S pretrain.lr=0.002 ...] [--name EXP] [--force] [--dvc-remote]
    python -m pipeline flow serve --cron "0 3 * * *"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from pipeline.common.errors import PipelineError
from pipeline.orchestration import dvc_ops
from pipeline.orchestration.dvc_ops import StageFailed, StageInfo
from pipeline.orchestration.report import inline_images

FLOW_NAME = "llm-pipeline"
ARTIFACT_KEY = "llm-pipeline-run"
# The report stage's page (stages/report.py), published as its own artifact with the plots inlined.
REPORT_STAGE, REPORT_MARKDOWN, REPORT_ARTIFACT_KEY = (
    "report",
    Path("reports/README.md"),
    "llm-pipeline-report",
)
# Stages that talk to the network (corpus download, the Ollama judge) get retries; the rest fail fast,
# because rerunning a deterministic training stage cannot fix what made it fail.
RETRIES = {"download": 2, "judge": 2}
RETRY_DELAY_S = 10.0


@task(name="reproduce-stage")
def reproduce_stage(
    project: str, stage: str, force: bool = False, pull: bool = False, unchanged: bool = False
) -> dict[str, Any]:
    """`dvc repro --single-item STAGE`: 'ran', 'skipped' (unchanged) or 'restored' (from DVC's run cache).

    unchanged: `dvc status`, run after the last stage that changed anything, already found it up to date.
    """
    logger = get_run_logger()
    if unchanged:
        logger.info("Stage '%s' didn't change (dvc status), skipping", stage)
        return {"stage": stage, "status": "skipped", "seconds": 0.0}
    outcome = dvc_ops.repro_stage(Path(project), stage, force=force, pull=pull, log=logger.info)
    logger.info("stage %s: %s in %.1f s", stage, outcome.status, outcome.seconds)
    return {"stage": stage, "status": outcome.status, "seconds": round(outcome.seconds, 2)}


@task(name="apply-params")
def apply_params(project: str, overrides: list[str]) -> None:
    dvc_ops.apply_param_overrides(Path(project), overrides)
    get_run_logger().info("params set: %s", " ".join(overrides))


@task(name="save-experiment")
def save_experiment(project: str, stages: list[StageInfo], name: str | None) -> str:
    """`dvc exp save`: the workspace (params, dvc.lock, metrics, plots) becomes a DVC experiment."""
    message = dvc_ops.save_experiment(Path(project), stages, name)
    get_run_logger().info(message)
    return name or message.split()[-1]


@task(name="push-to-remote", retries=2, retry_delay_seconds=RETRY_DELAY_S)
def push_to_remote(project: str) -> None:
    """`dvc push --run-cache`: outputs and run records to the DVC remote, for other machines to reuse."""
    done = dvc_ops.dvc(Path(project), "push", "--run-cache")
    get_run_logger().info(done.stdout.strip())


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def run_report(
    project: Path,
    stages: list[StageInfo],
    outcomes: dict[str, dict[str, Any]],
    experiment: str | None = None,
    error: str | None = None,
) -> str:
    """The run's markdown artifact: what each stage did, the metrics files' values, where the reports are."""
    lines = [f"# {FLOW_NAME} run", "", f"Project: `{project}`"]
    if experiment:
        lines.append(f"DVC experiment: `{experiment}` (see `dvc exp show`, `python -m pipeline compare`)")
    if error:
        lines += ["", f"**Failed:** {error}"]
    lines += ["", "## Stages", "", "| stage | outcome | seconds |", "|---|---|---|"]
    for stage in stages:
        outcome = outcomes.get(stage.name, {})
        lines.append(
            f"| {stage.name} | {outcome.get('status', 'not run')} | {_cell(outcome.get('seconds', ''))} |"
        )
    metrics = dvc_ops.read_metrics(project, stages)
    if metrics:
        lines += ["", "## Metrics", "", "| file | metric | value |", "|---|---|---|"]
        for path, values in metrics.items():
            lines += [f"| {path} | {key} | {_cell(value)} |" for key, value in values.items()]
    reports = [p for s in stages for p in (*s.reports, *s.plots) if (project / p).exists()]
    if reports:
        lines += ["", "## Reports", ""] + [f"- `{project / p}`" for p in reports]
    return "\n".join(lines) + "\n"


def _publish(
    project: Path, stages: list[StageInfo], outcomes: dict, experiment: str | None, error: str | None
):
    markdown = run_report(project, stages, outcomes, experiment, error)
    create_markdown_artifact(markdown, key=ARTIFACT_KEY, description=f"{FLOW_NAME}: stages, metrics, reports")
    page = project / REPORT_MARKDOWN
    if outcomes.get(REPORT_STAGE, {}).get("status") in ("ran", "skipped", "restored") and page.is_file():
        create_markdown_artifact(
            inline_images(page.read_text(encoding="utf-8"), page.parent),
            key=REPORT_ARTIFACT_KEY,
            description=f"{FLOW_NAME}: the run report ({REPORT_MARKDOWN}, plots inlined)",
        )


@flow(name=FLOW_NAME)
def pipeline_flow(
    stages: list[str] | None = None,
    overrides: list[str] | None = None,
    experiment: str | None = None,
    force: bool = False,
    dvc_remote: bool = False,
    project: str = ".",
) -> dict[str, str]:
    """Reproduce the DVC pipeline stage by stage; returns {stage: 'ran' | 'skipped' | 'restored'}.

    stages: which dvc.yaml stages (default all, in pipeline order). overrides: `key=value` params
    edits run as a DVC experiment named ``experiment``. force: rerun stages even when unchanged.
    dvc_remote: pull what a stage lacks (and the run cache) from the default DVC remote, push results back.
    """
    root = Path(project).resolve()
    pipeline = dvc_ops.read_stages(root)
    selected = dvc_ops.select_stages(pipeline, stages)
    as_experiment = bool(overrides) or experiment is not None
    if as_experiment:
        dvc_ops.require_experiment_files_tracked(root, pipeline)
        if experiment and dvc_ops.experiment_exists(root, experiment):
            raise PipelineError(
                f"experiment '{experiment}' already exists (`dvc exp remove {experiment}`, or rename)"
            )
        if overrides:
            apply_params(str(root), list(overrides))
    outcomes: dict[str, dict[str, Any]] = {}
    changed = None if force else dvc_ops.changed_stages(root)  # valid until a stage changes something
    try:
        for stage in selected:
            retries = RETRIES.get(stage.name, 0)
            run = reproduce_stage.with_options(
                task_run_name=stage.name, retries=retries, retry_delay_seconds=RETRY_DELAY_S if retries else 0
            )
            unchanged = changed is not None and stage.name not in changed
            outcomes[stage.name] = run(str(root), stage.name, force, dvc_remote, unchanged)
            if outcomes[stage.name]["status"] != "skipped":
                changed = None
    except StageFailed as exc:
        outcomes[exc.stage] = {"status": "failed"}
        _publish(root, selected, outcomes, None, str(exc))
        raise
    saved = save_experiment(str(root), pipeline, experiment) if as_experiment else None
    if dvc_remote:
        push_to_remote(str(root))
    _publish(root, selected, outcomes, saved, None)
    return {name: outcome["status"] for name, outcome in outcomes.items()}


def resume_schedules(deployment_id: Any) -> None:
    """Unpause a deployment and reactivate its schedules.

    `serve` pauses its deployments when it shuts down (so no runs pile up while nothing can run them);
    a restarted `serve` must switch them back on, or the nightly run silently stops (Prefect #16363).
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
        if deployment.paused:
            client.resume_deployment(deployment_id)
        for schedule in client.read_deployment_schedules(deployment_id):
            if not schedule.active:
                client.update_deployment_schedule(deployment_id, schedule.id, active=True)


def serve_pipeline(name: str, cron: str | None, timezone: str, parameters: dict[str, Any]) -> None:
    """Register the deployment ``llm-pipeline/<name>`` (on ``cron`` if given) and execute its runs here."""
    from prefect import serve
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    deployment = pipeline_flow.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)] if cron else None,
        parameters=parameters,
        paused=False,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    resume_schedules(deployment.apply())
    serve(deployment)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline flow", description="Run or schedule the pipeline."
    )
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run the pipeline once (DVC skips unchanged stages)")
    serve = sub.add_parser(
        "serve", help="serve a deployment: scheduled and triggered runs execute in this process"
    )
    for p in (run, serve):
        p.add_argument(
            "--stages", action="append", default=[], help="comma-separated dvc.yaml stages (default: all)"
        )
        p.add_argument(
            "-S",
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="params override, as in `dvc exp run -S` (runs as a DVC experiment)",
        )
        p.add_argument("--name", dest="experiment", help="DVC experiment name (implies an experiment)")
        p.add_argument("--force", action="store_true", help="rerun stages even if unchanged")
        p.add_argument(
            "--dvc-remote",
            action="store_true",
            help="pull missing data and the run cache from the DVC remote, push results back",
        )
        p.add_argument("--project", default=".", help="DVC project directory (default: .)")
    serve.add_argument("--cron", help='schedule, e.g. "0 3 * * *" (without it, runs only when triggered)')
    serve.add_argument("--timezone", default="UTC", help="timezone of the cron schedule (default UTC)")
    serve.add_argument("--deployment", default="scheduled", help="deployment name (default: scheduled)")
    return parser


def cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    parameters = {
        "stages": [s for item in args.stages for s in item.split(",") if s] or None,
        "overrides": args.overrides or None,
        "experiment": args.experiment,
        "force": args.force,
        "dvc_remote": args.dvc_remote,
        "project": str(Path(args.project).resolve()),
    }
    dvc_ops.select_stages(dvc_ops.read_stages(Path(parameters["project"])), parameters["stages"])
    if args.action == "serve":
        serve_pipeline(args.deployment, args.cron, args.timezone, parameters)
        return 0
    start = time.perf_counter()
    state = pipeline_flow(**parameters, return_state=True)
    result = state.result(raise_on_failure=False)
    if not state.is_completed():
        raise PipelineError(str(result) if isinstance(result, Exception) else (state.message or state.name))
    for stage, status in result.items():
        print(f"{stage:<12} {status}")
    print(f"flow {state.name.lower()} in {time.perf_counter() - start:.1f} s")
    return 0
