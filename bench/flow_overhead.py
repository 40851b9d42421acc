"""What the Prefect flow costs on top of a plain `dvc repro`: a full tiny run and a no-op rerun, same session.

    python -m bench.flow_overhead                    # two identical copies of the tiny test project
    python -m bench.flow_overhead --project . --rounds 3   # no-op reruns of an existing project (brought
                                                           # up to date first, untimed)

Baseline: `python -m dvc repro` in the project. Flow: `python -m pipeline flow run --project ...` as a user
runs it, (a) with no Prefect server configured (Prefect starts a temporary local one, every run) and (b)
against a `prefect server start` already running on 127.0.0.1 (started here, untimed). Wall seconds of
the whole command, median over ``--rounds`` alternating rounds. The full run uses two fresh identical
copies: one reproduced by `dvc repro`, the other by the flow. The last line is a ``key=value`` summary.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pipeline.orchestration.dvc_ops import dvc_env
from tests.helpers.project import make_project

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return seconds


def dvc_repro(project: Path, env: dict) -> float:
    return timed([sys.executable, "-m", "dvc", "repro"], project, env)


def flow_run(project: Path, env: dict) -> float:
    return timed([sys.executable, "-m", "pipeline", "flow", "run", "--project", str(project)], ROOT, env)


def start_server(env: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                return server, api
        except httpx.HTTPError:
            time.sleep(1)
    os.killpg(server.pid, signal.SIGKILL)
    sys.exit("error: prefect server did not answer /api/health within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, help="an existing DVC project: no-op reruns only")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flow-overhead-"))
    env = dict(
        dvc_env(),
        PREFECT_HOME=str(work / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        TQDM_DISABLE="1",
        LLM_PIPELINE_CACHE=os.environ.get("LLM_PIPELINE_CACHE", str(work / "cache")),
    )
    env.pop("PREFECT_API_URL", None)
    summary: dict[str, float | str] = {}
    if args.project:
        plain = flowed = args.project.resolve()
        dvc_repro(plain, env)
        summary["project"] = str(plain)
    else:
        plain, flowed = make_project(work / "plain"), make_project(work / "flow")
        summary["project"] = "tiny"
        summary["full_dvc_s"] = round(dvc_repro(plain, env), 2)
        summary["full_flow_s"] = round(flow_run(flowed, env), 2)
        summary["full_ratio"] = round(summary["full_flow_s"] / summary["full_dvc_s"], 3)
        print(f"full run: dvc repro {summary['full_dvc_s']} s, flow run {summary['full_flow_s']} s")

    server, api = start_server(env)
    try:
        served_env = dict(env, PREFECT_API_URL=api)
        noop: dict[str, list[float]] = {"dvc": [], "flow": [], "flow_server": []}
        for round_ in range(1, args.rounds + 1):
            noop["dvc"].append(dvc_repro(plain, env))
            noop["flow"].append(flow_run(flowed, env))
            noop["flow_server"].append(flow_run(flowed, served_env))
            print(f"no-op round {round_}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in noop.items()))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    for name, values in noop.items():
        summary[f"noop_{name}_s"] = round(statistics.median(values), 2)
    summary["noop_ratio"] = round(summary["noop_flow_s"] / summary["noop_dvc_s"], 3)
    summary["noop_server_ratio"] = round(summary["noop_flow_server_s"] / summary["noop_dvc_s"], 3)
    summary["rounds"] = args.rounds
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
