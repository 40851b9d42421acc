"""The import graph of the project, read from the source with `ast` (nothing is imported): stage closures and edges."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages")

# Modules a stage may leave out of its dvc.yaml deps, because editing them cannot change any stage's outputs.
OUTPUT_NEUTRAL = {
    "pipeline/__init__.py",  # empty package marker
    "stages/__init__.py",  # empty package marker
    "pipeline/common/errors.py",  # the wording of error lines and the exit code; never what a stage writes
}


def python_files(folder: str) -> list[str]:
    """Every .py file under ``folder``, subpackages included (a ``glob("*.py")`` would see only the top), as
    paths from the root (``pipeline/model/gpt.py``). Checks that walk the code use this, and count what they saw."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py"))


def module_file(module: str) -> str | None:
    """`pipeline.model.gpt` → 'pipeline/model/gpt.py' (or the package's __init__.py), None outside the project."""
    for candidate in (module.replace(".", "/") + ".py", module.replace(".", "/") + "/__init__.py"):
        if (ROOT / candidate).is_file():
            return candidate
    return None


@cache
def imports(path: str) -> frozenset[str]:
    """Project modules that ``path`` imports (at any depth of its code: lazy imports count too)."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in PACKAGES:
                names.append(node.module)
                names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES]
    return frozenset(f for f in map(module_file, names) if f and f != path and not f.endswith("/__init__.py"))


def closure(path: str) -> set[str]:
    """Every project module ``path`` runs, itself included."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += imports(current)
    return seen


def code_deps(stage_file: str) -> list[str]:
    """The code deps a stage must declare: its closure minus the output-neutral modules."""
    return sorted(closure(stage_file) - OUTPUT_NEUTRAL)
