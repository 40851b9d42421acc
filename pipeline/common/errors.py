"""How problems reach the user: one error type for bad input, the stage entry wrapper that turns it into one
line and exit 1, and a way to silence a library's own chatter around a call."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import sys
from collections.abc import Callable, Iterator


class PipelineError(Exception):
    """Bad input a user can fix: the message names the file or param and is printed as one line."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> str | None:
    """The one line for a write that found the disk (or the quota) full, naming the file; None for any other error.

    Outputs are written through ``common/atomic.py``, which names the output (not its temp path) and leaves
    nothing partial behind, so the line is all there is to say.
    """
    if not isinstance(exc, OSError) or exc.errno not in DISK_FULL:
        return None
    return f"{exc.filename or 'an output'}: no space left on device (errno {exc.errno}: free some space, then rerun)"


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Only errors from the logger ``name`` (an exporter's or transformers' warnings) while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def exit_on_error(main: Callable[..., object]) -> Callable[..., object]:
    """Run a stage's ``main``; a PipelineError (or a missing file, or a full disk) ends it with one line on stderr,
    exit 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (PipelineError, FileNotFoundError) as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            sys.exit(1)
        except OSError as exc:
            if (message := disk_full(exc)) is None:
                raise
            print(f"error: {one_line(message)}", file=sys.stderr)
            sys.exit(1)

    return wrapper
