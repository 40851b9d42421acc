"""Native code that can crash, run in a child process: a signal, a hang or an error there reaches the caller as one
exception, and the caller's process (a stage, the server, pytest) never loads that runtime itself.

The child is ``python -m pipeline.common.isolated MODULE:FUNCTION REQUEST RESULT``: it calls ``FUNCTION(**request)`` and
writes the JSON it returns, or the PipelineError it raised, to RESULT. Nothing is pickled: requests and results are
JSON, and arrays travel as ``.npy`` files (read without pickle) that the request names. This module knows nothing
of what runs in the child.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.common.errors import PipelineError, one_line

# The package's parent on the child's path: the child imports the same code as its parent, from any cwd.
CODE_ROOT = Path(__file__).resolve().parents[2]  # pipeline/common/isolated.py → the folder holding pipeline/


class ChildCrashed(PipelineError):
    """The child died of a signal or outran its timeout: the runtime failed, not the input."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause  # the signal's name (SIGSEGV, …) or "timeout"


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_isolated(
    target: str, request: dict, *, subject: str, runtime: str, advice: str, timeout: float
) -> dict:
    """``target`` (``module:function``) called with ``request`` in a child process; its JSON result.

    A PipelineError raised there is raised here with the same message; a death by signal or a timeout raises
    ChildCrashed with one line naming ``subject`` (the file), ``runtime``, the signal and ``advice``; any other
    failure raises PipelineError with the child's last line of stderr."""
    with tempfile.TemporaryDirectory(prefix="isolated-") as tmp:
        request_path, result_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_path.write_text(json.dumps(request), encoding="utf-8")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(CODE_ROOT), os.environ.get("PYTHONPATH")])),
        }
        command = [
            sys.executable,
            "-m",
            "pipeline.common.isolated",
            target,
            str(request_path),
            str(result_path),
        ]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:  # subprocess.run has killed the child (SIGKILL) by now
            raise ChildCrashed(
                f"{subject}: {runtime} did not finish within {timeout:g} s and was killed; {advice}",
                "timeout",
            ) from None
        if done.returncode < 0:
            name = signal_name(done.returncode)
            raise ChildCrashed(f"{subject}: {runtime} crashed ({name}) in its child process; {advice}", name)
        if result_path.is_file():
            payload = json.loads(result_path.read_text(encoding="utf-8"))
            if "error" in payload:
                raise PipelineError(payload["error"])
            return payload["result"]
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise PipelineError(f"{subject}: {runtime} failed in its child process: {one_line(last)}")


def main(argv: list[str]) -> int:
    target, request_path, result_path = argv
    module, function = target.split(":")
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    try:
        payload = {"result": getattr(importlib.import_module(module), function)(**request)}
    except PipelineError as exc:
        payload = {"error": one_line(exc)}
    Path(result_path).write_text(json.dumps(payload), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
