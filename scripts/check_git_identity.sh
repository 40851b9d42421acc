#!/usr/bin/env bash
# DVC experiments (`dvc exp run`, `python -m pipeline sweep`) are git commits: without a git identity they fail
# with DVC's own message. Say so at setup, with the command to run (a warning: the pipeline itself runs without).
if ! git config user.name >/dev/null 2>&1 || ! git config user.email >/dev/null 2>&1; then
  echo "warning: git has no user identity, which \`dvc exp run\` needs to record experiments. Set one:" >&2
  echo "  git config --global user.name \"Your Name\" && git config --global user.email \"you@example.com\"" >&2
fi
