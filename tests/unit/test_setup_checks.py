"""scripts/setup.sh warns, with the command to run, when git has no identity (DVC experiments need one)."""

from __future__ import annotations

import os
import subprocess

from tests.helpers.project import ROOT

SCRIPT = ROOT / "scripts" / "check_git_identity.sh"


def _check(repo, home) -> str:
    env = {
        **os.environ,
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"),
    }
    for name in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        env.pop(name, None)
    done = subprocess.run(
        ["bash", str(SCRIPT)], cwd=repo, env=env, capture_output=True, text=True, check=True
    )
    return done.stderr


def test_missing_git_identity_is_named_with_the_fix(tmp_path):
    repo, home = tmp_path / "repo", tmp_path / "home"
    repo.mkdir()
    home.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    err = _check(repo, home)
    assert err.startswith("warning: git has no user identity") and "git config --global user.name" in err
    subprocess.run(["git", "config", "user.name", "A"], cwd=repo, check=True)
    subprocess.run(["git", "config", "user.email", "a@example.invalid"], cwd=repo, check=True)
    assert _check(repo, home) == ""
