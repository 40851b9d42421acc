"""pipeline.common.isolated: what a child process's death, hang, refusal or failure becomes in the parent. The targets
below run in the child (it imports this module by name)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline.common.errors import PipelineError
from pipeline.common.isolated import ChildCrashed, run_isolated

ONE_LINE = {"subject": "models/gguf/m.gguf", "runtime": "the runtime", "advice": "do this"}


def echo(**request) -> dict:
    return {"got": request, "pid": os.getpid()}


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def hang() -> None:
    time.sleep(120)


def refuse(what: str) -> None:
    raise PipelineError(f"{what}: refused\n  on two lines")


def fail() -> None:
    raise RuntimeError("an unexpected failure")


def test_the_result_comes_back_from_another_process():
    result = run_isolated(f"{__name__}:echo", {"a": [1, 2], "b": "ñ"}, timeout=120, **ONE_LINE)
    assert result["got"] == {"a": [1, 2], "b": "ñ"} and result["pid"] != os.getpid()


def test_a_signal_is_one_line_naming_the_file_the_runtime_the_signal_and_what_to_do():
    with pytest.raises(ChildCrashed) as exc:
        run_isolated(f"{__name__}:segfault", {}, timeout=120, **ONE_LINE)
    assert str(exc.value) == "models/gguf/m.gguf: the runtime crashed (SIGSEGV) in its child process; do this"
    assert exc.value.cause == "SIGSEGV"


def test_a_hang_is_killed_after_the_timeout():
    with pytest.raises(ChildCrashed) as exc:
        run_isolated(f"{__name__}:hang", {}, timeout=3, **ONE_LINE)
    assert (
        str(exc.value) == "models/gguf/m.gguf: the runtime did not finish within 3 s and was killed; do this"
    )
    assert exc.value.cause == "timeout"


def test_a_refusal_keeps_its_message_and_is_no_crash():
    with pytest.raises(PipelineError) as exc:
        run_isolated(f"{__name__}:refuse", {"what": "x.gguf"}, timeout=120, **ONE_LINE)
    assert str(exc.value) == "x.gguf: refused on two lines" and not isinstance(exc.value, ChildCrashed)


def test_any_other_failure_is_one_line_with_the_childs_last_words():
    with pytest.raises(PipelineError) as exc:
        run_isolated(f"{__name__}:fail", {}, timeout=120, **ONE_LINE)
    assert str(exc.value) == (
        "models/gguf/m.gguf: the runtime failed in its child process: RuntimeError: an unexpected failure"
    )
