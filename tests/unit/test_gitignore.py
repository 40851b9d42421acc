"""git and DVC agree on who owns each output: what DVC caches (or keeps between runs) is git-ignored, and the
``cache: false`` metrics, plots and reports, which DVC leaves to git, are not."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.helpers.project import ROOT


def dvc_outputs() -> list[tuple[str, bool]]:
    """(path, whether git must ignore it) for every output of every stage in dvc.yaml."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind) or []:
                path, options = (out, {}) if isinstance(out, str) else next(iter(out.items()))
                options = options or {}
                owned_by_dvc = options.get("cache", True) or options.get("persist", False)
                found.append((path, owned_by_dvc))
    return found


@pytest.mark.parametrize("path, ignored", dvc_outputs(), ids=[p for p, _ in dvc_outputs()])
def test_gitignore_matches_what_dvc_tracks(path, ignored):
    # --no-index: the answer from the ignore rules alone, whether or not the path exists here.
    result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
    assert (result.returncode == 0) == ignored, (
        f"{path}: {'should' if ignored else 'should not'} be git-ignored"
    )
