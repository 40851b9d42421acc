"""Each stage's wall time, for the run report: ``reports/<stage>/timing.json``, written when the stage ends.

Wall time depends on the machine and its load, so it is kept out of the DVC metrics files (which must be equal
for equal params) and out of ``dvc.yaml``: the report reads it, nothing compares it. One decorator on every
stage's ``main`` records it; the stage's name is its module's (``python -m stages.pretrain`` → ``pretrain``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from pipeline.common.atomic import write_json

REPORTS = Path("reports")
TIMING_FILE = "timing.json"


def timed(main: Callable[[], object] | None = None, *, main_process: Callable[[], bool] = lambda: True):
    """Record how long ``main`` took, when it succeeds (a failed stage leaves the previous record alone).

    ``@timed`` on single-process stages; ``@timed(main_process=runtime.is_main)`` on stages that may run under
    torchrun, so that rank 0 alone writes (this module stays torch-free for the others).
    """
    if main is None:
        return functools.partial(timed, main_process=main_process)
    spec = main.__globals__.get("__spec__")  # run as `python -m stages.pretrain`, the module is __main__
    stage = (spec.name if spec else main.__module__).rsplit(".", 1)[-1]

    @functools.wraps(main)
    def wrapper():
        started = datetime.now(timezone.utc)
        start = time.perf_counter()
        result = main()
        if main_process():
            write_json(
                REPORTS / stage / TIMING_FILE,
                {
                    "stage": stage,
                    "seconds": round(time.perf_counter() - start, 2),
                    "started_at": started.isoformat(timespec="seconds"),
                    "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                },
            )
        return result

    return wrapper
