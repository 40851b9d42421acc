"""A real `prefect server` on 127.0.0.1 (SQLite in a temp PREFECT_HOME): `flow serve --cron` registers a
scheduled deployment, `prefect deployment run` triggers it and the served process runs it to Completed.
Stopping `serve` pauses the deployment (Prefect's shutdown behaviour); a restarted `serve` must switch the
schedule back on. The repository's prefect.yaml deploys to a process work pool whose worker clones the code,
runs the stages and pushes to the DVC remote. Every process is started in its own session and killed at the
end; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.helpers.serving import free_port
from tests.helpers.trivial_project import make_trivial_project

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(420)


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the process group we started (the server's and runner's children included), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def prefect(*args: str, env: dict, cwd: Path = ROOT, timeout_s: float = 120) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def flow_run_state(api: str, run_id: str) -> dict | None:
    state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]
    return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None


def wait_for(check: Callable[[], object], what: str, timeout_s: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{log.read_text()[-3000:]}")
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout_s} s\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(api url, client env, log dir) of a fresh `prefect server start` on a free port."""
    logs = tmp_path_factory.mktemp("logs")
    port = free_port()
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-home")),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DVC_NO_ANALYTICS="1",
    )
    env.pop("PREFECT_API_URL", None)
    proc = start(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        logs / "server.log",
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(
            lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200,
            "prefect server health",
            180,
            proc,
            logs / "server.log",
        )
        yield api, dict(env, PREFECT_API_URL=api), logs
    finally:
        stop(proc)


def deployment(api: str) -> dict | None:
    response = httpx.get(f"{api}/deployments/name/llm-pipeline/nightly", timeout=10)
    return response.json() if response.status_code == 200 else None


def schedule_on(api: str) -> dict | None:
    found = deployment(api)
    if found and not found["paused"] and found["schedules"] and all(s["active"] for s in found["schedules"]):
        return found
    return None


def test_served_deployment_runs_and_its_schedule_survives_a_restart(server, tmp_path):
    api, env, logs = server
    project = make_trivial_project(tmp_path / "project")
    serve_cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "flow",
        "serve",
        "--cron",
        "0 3 * * *",
        "--deployment",
        "nightly",
        "--project",
        str(project),
    ]
    log = logs / "serve.log"
    serve = start(serve_cmd, env, log)
    try:
        found = wait_for(lambda: schedule_on(api), "deployment with an active schedule", 120, serve, log)
        assert found["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        assert found["parameters"]["project"] == str(project)

        trigger = prefect("deployment", "run", "llm-pipeline/nightly", env=env)
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", trigger).group(1)
        state = wait_for(lambda: flow_run_state(api, run_id), "triggered flow run", 180, serve, log)
        assert state["type"] == "COMPLETED", state
        tasks = httpx.post(
            f"{api}/task_runs/filter", timeout=10, json={"flow_runs": {"id": {"any_": [run_id]}}}
        ).json()
        assert sorted(t["name"] for t in tasks) == ["download", "report", "train"]
        assert all(t["state"]["type"] == "COMPLETED" for t in tasks)
        assert (project / "reports/report/report.md").is_file()

        stop(serve)
        assert deployment(api)["paused"], "serve no longer pauses its deployment on shutdown"
        serve = start(serve_cmd, env, log)
        wait_for(lambda: schedule_on(api), "schedule active again after restart", 120, serve, log)
    finally:
        stop(serve)


def test_prefect_yaml_deploys_to_a_work_pool_whose_worker_runs_the_pipeline(server, tmp_path):
    """prefect.yaml as shipped, with its repository pointed at a local git repo holding the code."""
    api, env, logs = server
    origin = make_trivial_project(tmp_path / "origin")
    shutil.copytree(ROOT / "pipeline", origin / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    spec = (ROOT / "prefect.yaml").read_text()
    assert "https://github.com/YOUR-ORG/llm-pipeline.git" in spec
    (origin / "prefect.yaml").write_text(
        spec.replace("https://github.com/YOUR-ORG/llm-pipeline.git", str(origin))
    )
    remote = tmp_path / "dvc-remote"
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(remote)], cwd=origin, check=True
    )
    subprocess.run(["git", "add", "-A"], cwd=origin, check=True)
    subprocess.run(["git", "commit", "-qm", "code and deployments"], cwd=origin, check=True)

    prefect("work-pool", "create", "llm-pipeline", "--type", "process", env=env)
    prefect("--no-prompt", "deploy", "--all", env=env, cwd=origin)
    run_id = re.search(
        r"UUID: ([0-9a-f-]{36})", prefect("deployment", "run", "llm-pipeline/nightly", env=env)
    ).group(1)
    workdir = tmp_path / "worker"
    workdir.mkdir()
    worker_env = dict(env, PATH=os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]]))
    log = logs / "worker.log"
    with open(log, "ab") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "llm-pipeline", "--run-once"],
            cwd=workdir,
            env=worker_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        worker.wait(240)
    finally:
        stop(worker)
    state = flow_run_state(api, run_id)
    assert state and state["type"] == "COMPLETED", (state, log.read_text()[-3000:])
    assert any(path.is_file() for path in remote.rglob("*")), "the run pushed nothing to the DVC remote"
