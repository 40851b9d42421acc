"""Reading the project's JSON files with one error ladder, and flattening nested mappings to one key convention.

A file a stage needs is missing, not JSON, or not the shape asked for: one ``PipelineError`` line naming the file
(and, where given, how to make it). What the fields must hold is each caller's business. No torch import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.common.errors import PipelineError

SHAPES = {dict: "object", list: "array"}


def read_json(path: str | Path, what: str, missing: str = "", shape: type = dict) -> Any:
    """``path``'s JSON value, which must be a ``shape`` (``object`` accepts any). ``what`` names the file in errors
    ("shard manifest"); ``missing`` says how to make it ("run `dvc repro tokenize`")."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: {what} not found" + (f" ({missing})" if missing else ""))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise PipelineError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, shape):
        raise PipelineError(f"{path}: not a {what} (a JSON {SHAPES.get(shape, shape.__name__)})")
    return data


def read_jsonl(path: str | Path, what: str, missing: str = "") -> list[tuple[int, Any]]:
    """(line number, JSON value) for every non-blank line of a JSON Lines file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: {what} not found" + (f" ({missing})" if missing else ""))
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except ValueError as exc:
                raise PipelineError(f"{path}: line {number} is not valid JSON ({exc})") from None
    return records


def flatten(data: Any, sep: str = ".", lists: bool = True, prefix: str = "") -> dict[str, Any]:
    """{"val": {"loss": 1}} → {"val.loss": 1}, keys joined by ``sep``; ``lists=False`` leaves lists out (they are
    not scalar metrics). Anything but a mapping flattens to nothing."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{prefix}{sep}{key}" if prefix else str(key)
            if isinstance(value, dict):
                out.update(flatten(value, sep, lists, name))
            elif lists or not isinstance(value, list):
                out[name] = value
    return out
