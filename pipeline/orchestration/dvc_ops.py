"""DVC as the orchestrators see it: the stage list, one stage reproduced with its outcome, experiments.

`dvc.yaml` stays the single source of truth for the graph. Stages run through the `dvc` CLI in a
subprocess, so each one gets DVC's own locking, run cache and skip-if-unchanged logic, and its output
streams line by line to whoever logs it (a Prefect task, a terminal).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.common.errors import PipelineError, one_line
from pipeline.common.json_files import flatten, read_json

REPORT_SUFFIXES = (".md", ".png", ".csv", ".html", ".jsonl")
# What `dvc repro` prints when it runs a stage's command, or checks its outputs out of the run cache instead
# (when it prints neither, the stage was unchanged).
_RAN = re.compile(r"^Running stage '[^']+'")
_RESTORED = re.compile(r"^Stage '[^']+' is cached - skipping run")


@dataclass(frozen=True)
class StageInfo:
    """One dvc.yaml stage: its upstream stages and the files people read after a run."""

    name: str
    upstream: tuple[str, ...]
    metrics: tuple[str, ...]
    plots: tuple[str, ...]
    reports: tuple[str, ...]
    uncached: tuple[
        str, ...
    ]  # outputs DVC leaves to git (`cache: false`): what an experiment commit must hold


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    status: str  # "ran" | "skipped" (unchanged) | "restored" (outputs checked out from DVC's run cache)
    seconds: float


class StageFailed(PipelineError):
    """A stage exited non-zero; the message carries the stage's own one-line `error: ...`."""

    def __init__(self, stage: str, error: str):
        super().__init__(f"stage '{stage}' failed: {error}")
        self.stage, self.error = stage, error

    def __reduce__(self):  # Prefect pickles task exceptions into their Failed state
        return type(self), (self.stage, self.error)


def dvc_env() -> dict[str, str]:
    """Environment for DVC and the stages: this interpreter's `python` first on PATH, no analytics,
    unbuffered output, progress bars at most every 10 s (they end up in logs, not on a terminal)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TQDM_MININTERVAL", "10")
    return env


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a short `dvc` command in ``project``; a failure raises with DVC's own error line."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, env=dvc_env(), capture_output=True, text=True
    )
    if check and done.returncode != 0:
        raise PipelineError(f"dvc {' '.join(args)} (in {project}): {error_line(done.stdout + done.stderr)}")
    return done


def error_line(output: str | Iterable[str], returncode: int | None = None) -> str:
    """The line that says what went wrong: the stage's own `error: ...`, else DVC's `ERROR: ...`."""
    lines = [line.strip() for line in (output.splitlines() if isinstance(output, str) else output)]
    lines = [line for line in lines if line]
    for prefix in ("error: ", "ERROR: "):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            return one_line(found[-1])
    if lines:
        return one_line(lines[-1])
    return f"exited with code {returncode}"


def _relative(path: str, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _address(stage: Any, project: Path) -> str:
    """The stage's name as `dvc repro` takes it in ``project`` (whatever this process's cwd is)."""
    dvcfile = _relative(stage.dvcfile.path, project)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def read_stages(project: Path) -> list[StageInfo]:
    """The stages of ``project``'s dvc.yaml in file order (moved only where a stage precedes its upstream)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(project)) as repo:
            graph = repo.index.graph
            stages = [
                StageInfo(
                    name=_address(stage, project),
                    upstream=tuple(_address(up, project) for up in graph.successors(stage)),
                    metrics=tuple(_relative(o.fs_path, project) for o in stage.outs if o.metric),
                    plots=tuple(_relative(o.fs_path, project) for o in stage.outs if o.plot),
                    reports=tuple(
                        _relative(o.fs_path, project)
                        for o in stage.outs
                        if o.fs_path.endswith(REPORT_SUFFIXES)
                    ),
                    uncached=tuple(_relative(o.fs_path, project) for o in stage.outs if not o.use_cache),
                )
                for stage in repo.index.stages
            ]
    except DvcException as exc:
        raise PipelineError(f"{project / 'dvc.yaml'}: {one_line(exc)}") from None
    if not stages:
        raise PipelineError(f"{project / 'dvc.yaml'}: no stages")
    return _upstream_first(stages)


def _upstream_first(stages: list[StageInfo]) -> list[StageInfo]:
    ordered: list[StageInfo] = []
    placed: set[str] = set()
    pending = list(stages)
    while pending:
        ready = next(s for s in pending if set(s.upstream) <= placed)  # DVC refuses cycles, so one is ready
        pending.remove(ready)
        ordered.append(ready)
        placed.add(ready.name)
    return ordered


def select_stages(stages: list[StageInfo], names: Iterable[str] | None) -> list[StageInfo]:
    """The named stages in pipeline order (all when ``names`` is empty); an unknown name is an error."""
    wanted = [name for name in (names or []) if name]
    known = {s.name for s in stages}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise PipelineError(
            f"dvc.yaml: no stage '{unknown[0]}' (stages: {', '.join(s.name for s in stages)})"
        )
    return [s for s in stages if not wanted or s.name in wanted]


def changed_stages(project: Path) -> set[str]:
    """The stages `dvc status` finds changed: one DVC call answers for the whole pipeline, where a
    `dvc repro` per stage would load the project and hash its dependencies once per stage."""
    return set(json.loads(dvc(project, "status", "--json").stdout or "{}"))


def repro_stage(
    project: Path, stage: str, *, force: bool = False, pull: bool = False, log: Callable[[str], None] = print
) -> StageOutcome:
    """`dvc repro --single-item STAGE`, streaming its output to ``log``; raises StageFailed on failure.

    ``pull``: fetch missing inputs and the run cache from the DVC remote first, so a stage that ran
    on another machine with the same inputs is checked out instead of run again.
    """
    options = [*(["--force"] if force else []), *(["--pull"] if pull else [])]
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", *options, stage]
    start = time.perf_counter()
    tail: deque[str] = deque(maxlen=200)
    status = "skipped"
    with subprocess.Popen(
        cmd,
        cwd=project,
        env=dvc_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            log(line)
            tail.append(line)
            if _RAN.match(line):
                status = "ran"
            elif _RESTORED.match(line) and status != "ran":
                status = "restored"
        returncode = proc.wait()
    if returncode != 0:
        raise StageFailed(stage, error_line(tail, returncode))
    return StageOutcome(stage, status, time.perf_counter() - start)


def apply_param_overrides(project: Path, overrides: list[str]) -> None:
    """Edit the params files the way `dvc exp run -S key=value` does (same DVC/Hydra override grammar)."""
    from dvc.exceptions import DvcException
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides, to_hydra_overrides

    for path, items in to_path_overrides(overrides).items():
        target = project / path
        if not target.is_file():
            raise PipelineError(f"{target}: params file not found (override {items[0]!r})")
        if any(o.is_sweep_override() for o in to_hydra_overrides(items)):
            raise PipelineError(
                f"{path}: {items} is a sweep; run several values with `python -m pipeline sweep`"
            )
        try:
            apply_overrides(str(target), items)
        except DvcException as exc:
            cause = one_line(exc.__cause__ or exc)
            raise PipelineError(f"{path}: cannot apply {', '.join(items)}: {cause}") from None


def git_ignored(project: Path, paths: Iterable[str]) -> list[str]:
    """The paths git ignores: DVC experiments commit metrics and plots to git, so these would be lost."""
    paths = list(paths)
    if not paths:
        return []
    done = subprocess.run(["git", "check-ignore", *paths], cwd=project, capture_output=True, text=True)
    return done.stdout.split()


def require_experiment_files_tracked(project: Path, stages: list[StageInfo]) -> None:
    """Refuse to start an experiment whose uncached metrics or plots git would ignore (they would silently
    vanish; cached ones travel in DVC's cache, which the experiment's dvc.lock points at)."""
    ignored = git_ignored(project, [p for s in stages for p in (*s.metrics, *s.plots) if p in s.uncached])
    if ignored:
        raise PipelineError(
            f"{ignored[0]} is git-ignored, so DVC experiments would record no metrics/plots for it: "
            f"un-ignore it in {project / '.gitignore'} (metrics and plots with `cache: false` belong in git)"
        )


def save_experiment(project: Path, stages: Iterable[StageInfo], name: str | None) -> str:
    """`dvc exp save`, including the stages' uncached outputs (metrics, plots, reports) that git does not
    track yet — as `dvc exp run` stages them — so the experiment commit carries its results."""
    existing = [p for s in stages for p in s.uncached if (project / p).exists()]
    ignored = set(git_ignored(project, existing))
    include = [arg for p in existing if p not in ignored for arg in ("--include-untracked", p)]
    done = dvc(project, "exp", "save", *(["--name", name] if name else []), *include)
    return done.stdout.strip()


def head_commit(project: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"{project}: not a git repository with a commit (DVC experiments need one)")
    return done.stdout.strip()


def experiment_exists(project: Path, name: str) -> bool:
    """Whether an experiment called ``name`` already hangs off the current commit (DVC's own ref layout)."""
    baseline = head_commit(project)
    ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
    return subprocess.run(["git", "show-ref", "--quiet", ref], cwd=project).returncode == 0


def read_metrics(project: Path, stages: Iterable[StageInfo]) -> dict[str, dict[str, Any]]:
    """{metrics file: {flattened key: value}} for the metrics files that exist."""
    found: dict[str, dict[str, Any]] = {}
    for stage in stages:
        for path in stage.metrics:
            file = project / path
            if file.is_file():
                found[path] = flatten(read_json(file, "metrics file", shape=object), lists=False)
    return found
