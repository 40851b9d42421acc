"""Did two runs of the pipeline make the same things? Compares two project directories after `dvc repro`: the
sha256 of every weight file under models/ and every value of every reports/*/metrics.json, and prints what
differs. Provenance (code version, times, paths) is not compared: it is meant to differ.

    python scripts/same_outputs.py ../before ../after      # exit 0 when identical, 1 otherwise

Used to prove that a refactor moved code and nothing else (the same params on the same machine must give the
same weights and metrics).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

WEIGHTS = ("*.safetensors", "*.onnx", "*.gguf")
# Keys that say when, where or with which code a run happened, not what it made; and wall-clock rates.
NOT_COMPARED = (
    "provenance",
    "seconds",
    "tokens_per_s",
    "tok_s",
    "mfu",
    "timing",
    "elapsed",
    "wall",
    "_at",
    "rate",
)


def digests(root: Path) -> dict[str, str]:
    files = sorted(p for pattern in WEIGHTS for p in (root / "models").rglob(pattern))
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def flat(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def metrics(root: Path) -> dict[str, object]:
    found = {}
    for path in sorted((root / "reports").glob("*/metrics.json")):
        for key, value in flat(json.loads(path.read_text(encoding="utf-8"))).items():
            if not any(part in key for part in NOT_COMPARED):
                found[f"{path.parent.name}: {key}"] = value
    return found


def main(a: Path, b: Path) -> int:
    differ = 0
    for name, (left, right) in (("weights", (digests(a), digests(b))), ("metrics", (metrics(a), metrics(b)))):
        keys = sorted(set(left) | set(right))
        changed = [k for k in keys if left.get(k) != right.get(k)]
        print(f"{name}: {len(keys) - len(changed)} of {len(keys)} identical")
        for key in changed:
            print(f"  {key}: {left.get(key, '(absent)')} → {right.get(key, '(absent)')}")
        differ += len(changed)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
