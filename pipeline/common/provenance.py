"""Where an output came from: code version, params, package versions — embedded in every stage's outputs.

A model or report with this record can be traced back to the commit and params that made it, and a
result that does not reproduce can be checked for a dirty tree or a different library first.
Cheap and torch-free: versions come from package metadata, nothing heavy is imported.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.common.config import read_yaml
from pipeline.common.errors import PipelineError

PACKAGES = (
    "torch",
    "numpy",
    "tiktoken",
    "rustbpe",
    "safetensors",
    "dvc",
    "dvclive",
    "prefect",
    "onnx",
    "onnxruntime",
    "pandas",
    "transformers",
    "huggingface_hub",
    "tokenizers",
    "llm-pipeline",
)


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: str | Path = ".") -> dict[str, Any]:
    """HEAD commit and whether tracked files differ from it (untracked files do not count)."""
    root = Path(root)
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(changes) if changes is not None else None}


def params_hash(params: Any) -> str:
    """sha256 of params as canonical JSON: the same values hash the same whatever the YAML layout."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _read_params(path: Path, sections: Iterable[str]) -> tuple[dict, list[str]]:
    data = read_yaml(path) or {}
    names = sorted(sections) or sorted(data)
    missing = [name for name in names if name not in data]
    if missing:
        raise PipelineError(f"{path}: no section '{missing[0]}' to hash")
    return {name: data[name] for name in names}, names


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(
    sections: Iterable[str] = (), *, root: str | Path = ".", params_file: str = "params.yaml"
) -> dict[str, Any]:
    """The record to embed in an output. ``sections``: the params sections the output depends on (all if empty).

    Keep it out of metrics files: the commit differs between clones, so it would break byte-for-byte
    comparisons of metrics that are otherwise identical.
    """
    root = Path(root)
    selected, names = _read_params(root / params_file, sections)
    return {
        "git": git_state(root),
        "params": {"file": params_file, "sections": names, "sha256": params_hash(selected)},
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
    }
