"""A git + DVC project whose stages are trivial Python commands: the orchestration mechanics
(order, skipping, failures, experiments, schedules) tested in seconds, without training anything.

Stages (dvc.yaml order): download → train → report. `train` writes metrics and a dvclive-style loss
curve; it fails with the stages' `error: ...` convention when params say `train.fail: true`; `download`
fails once when the file `.flaky` exists (a transient error, for retries).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

STEPS = r"""
import json, math, os, sys
from pathlib import Path
import yaml

params = yaml.safe_load(open("params.yaml"))
step = sys.argv[1]
if step == "download":
    flaky = Path(".flaky")
    if flaky.exists():
        flaky.unlink()
        print("error: download: connection reset (transient)", file=sys.stderr)
        sys.exit(1)
    Path("data").mkdir(exist_ok=True)
    Path("data/raw.txt").write_text("x" * params["download"]["size"])
elif step == "train":
    p = params["train"]
    if p["fail"]:
        print("error: params.yaml: train.fail is true", file=sys.stderr)
        sys.exit(1)
    size = len(Path("data/raw.txt").read_text())
    curve = [round(2.0 * math.exp(-p["lr"] * s) + 0.01 * size / 100, 6) for s in range(p["steps"])]
    out = Path("reports/train/plots/metrics/train")
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss.tsv").write_text("step\tloss\n" + "".join(f"{s}\t{v}\n" for s, v in enumerate(curve)))
    Path("models").mkdir(exist_ok=True)
    Path("models/model.txt").write_text(f"lr={p['lr']}\n")
    metrics = {"val": {"loss": curve[-1]}, "bits_per_byte": round(curve[-1] / math.log(2), 6), "steps": p["steps"]}
    Path("reports/train/metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
elif step == "report":
    metrics = json.loads(Path("reports/train/metrics.json").read_text())
    Path("reports/report").mkdir(parents=True, exist_ok=True)
    Path("reports/report/report.md").write_text(f"# Report\n\nval loss {metrics['val']['loss']}\n")
"""

DVC_YAML = {
    "stages": {
        "download": {
            "cmd": "python steps.py download",
            "deps": ["steps.py"],
            "params": ["download"],
            "outs": ["data/raw.txt"],
        },
        "train": {
            "cmd": "python steps.py train",
            "deps": ["steps.py", "data/raw.txt"],
            "params": ["train"],
            "outs": ["models/model.txt"],
            "metrics": [{"reports/train/metrics.json": {"cache": False}}],
            "plots": [{"reports/train/plots/metrics": {"x": "step", "cache": False}}],
        },
        "report": {
            "cmd": "python steps.py report",
            "deps": ["steps.py", "reports/train/metrics.json"],
            "outs": [{"reports/report/report.md": {"cache": False}}],
        },
    }
}

PARAMS = {"download": {"size": 100}, "train": {"lr": 0.1, "steps": 20, "fail": False}}


def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def make_trivial_project(dest: Path, params: dict | None = None) -> Path:
    """A committed git + DVC repo at ``dest`` with the three trivial stages."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "steps.py").write_text(STEPS.lstrip())
    (dest / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (dest / "params.yaml").write_text(yaml.safe_dump(params or PARAMS, sort_keys=False))
    (dest / ".gitignore").write_text(".flaky\n")
    _run(["git", "init", "-q", "-b", "main"], dest)
    _run(["git", "config", "user.email", "tests@example.invalid"], dest)
    _run(["git", "config", "user.name", "tests"], dest)
    _run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    _run(["git", "add", "-A"], dest)
    _run(["git", "commit", "-q", "-m", "trivial project"], dest)
    return dest
