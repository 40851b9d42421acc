"""Param profiles: a YAML file of overrides (e.g. ``params-gpu.yaml``) turned into `dvc exp run -S` arguments.

    dvc exp run -n gpu $(python -m pipeline.common.profile params-gpu.yaml)

The overrides are merged into params.yaml and validated first, so a bad profile fails here, naming the key;
keys params.yaml does not have yet are emitted as ``+key=value`` (DVC's syntax for adding a key).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from pipeline.common.config import ConfigError, parse_params, read_yaml
from pipeline.common.errors import PipelineError, one_line
from pipeline.common.json_files import flatten


def _has(data: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def merge_params(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` laid over it, section by section (a profile over params.yaml)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = (
            merge_params(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def _read(path: Path) -> dict:
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of params sections")
    return data


def _hydra(value: object) -> str:
    """A list or mapping in the override grammar DVC's -S reads (Hydra's), with no spaces: {url:'https://…',sha256:…}."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_hydra(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def set_param_args(profile: Path, params: Path = Path("params.yaml")) -> list[str]:
    """``-S key=value`` pairs for every leaf of ``profile``, after checking the merged params are valid."""
    base, overrides = _read(params), _read(profile)
    parse_params(merge_params(base, overrides), f"{params} + {profile}")
    args = []
    for key, value in flatten(overrides).items():
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        if any(c.isspace() for c in text) and isinstance(value, dict | list):
            text = _hydra(value)
        if any(c.isspace() for c in text):
            raise ConfigError(f"{profile}: {key} has whitespace in its value; set it in params.yaml instead")
        args += ["-S", f"{'' if _has(base, key) else '+'}{key}={text}"]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(
            "usage: python -m pipeline.common.profile PROFILE.yaml  (prints `dvc exp run -S` arguments)",
            file=sys.stderr,
        )
        return 2
    try:
        print(" ".join(set_param_args(Path(argv[0]))))
    except PipelineError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
