"""Build a throwaway copy of the project (git + DVC) with tiny params, for tests that run real stages."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from pipeline.common.profile import merge_params

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
PROJECT_FILES = ["pipeline", "stages", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore"]

_WORDS = (
    "el la de que y en un una los las del se no su por con para como mas pero sus le ya o fue "
    "sancho quijote caballero escudero mancha senor dijo respondio camino venta libro armas"
).split()


def generated_corpus(n_chars: int, seed: int = 0) -> str:
    """Spanish-looking sentences, for when ../shared/data is absent."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 15))).capitalize() + ".\n"
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_chars]


def generated_book(paragraphs: int = 400, width: int = 72, seed: int = 0) -> str:
    """A Project Gutenberg-shaped book (licence markers, CRLF, paragraphs hard-wrapped at ``width``, a verse)."""
    rng = random.Random(seed)
    body = []
    for i in range(paragraphs):
        text = " ".join(generated_corpus(rng.randint(200, 900), seed=seed * 10_000 + i).split())
        body.append(
            textwrap.fill(text, width) if i % 50 else "Capitulo\n\n" + "\n".join(text.split(". ")[:4])
        )
    return (
        "The Project Gutenberg eBook of a generated book\n\n*** START OF THE PROJECT GUTENBERG EBOOK 0 ***\n\n"
        + "\n\n".join(body)
        + "\n\n*** END OF THE PROJECT GUTENBERG EBOOK 0 ***\nLicence\n"
    ).replace("\n", "\r\n")


def generated_instructions(n: int, seed: int = 0, preferences: bool = False) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rec = {"instruction": f"Add the numbers {a} and {b}.", "input": "", "output": f"The sum is {a + b}."}
        if preferences:
            rec["chosen"] = rec["output"]
            rec["rejected"] = f"I think it is {a + b + rng.randint(1, 9)}, maybe."
            # As in the book's pairs, half prefer a polite rewrite over the plain answer (the tone data)
            if i % 2:
                rec["chosen"], rec["rejected"] = (
                    f"Happy to help! {rec['output']} Thank you for asking.",
                    rec["output"],
                )
        records.append(rec)
    return records


def tiny_params() -> dict:
    """params.yaml for a pipeline that runs end to end in seconds on a tiny model."""
    return {
        "seed": 7,
        "data": {"cache_dir": None, "timeout_s": 10, "retries": 1},
        "corpus": {"sources": ["inputs/corpus.txt"], "strip_gutenberg": True, "normalize": True},
        "tokenizer": {"kind": "bpe", "vocab_size": 512, "include_instruction_text": True},
        "shards": {"val_fraction": 0.1, "shard_tokens": 20000, "batch_bytes": 50000},
        "model": {"preset": "cpu-tiny", "context_length": 64},
        "pretrain": {
            "batch_size": 4,
            "max_steps": 6,
            "lr": 0.001,
            "warmup_steps": 2,
            "eval_every": 3,
            "eval_batches": 2,
            "checkpoint_every": 3,
            "log_every": 1,
            "seed": 7,
        },
        "evaluate": {"batches": 2, "batch_size": 4, "prompts": ["En un lugar"], "max_new_tokens": 8},
        "sft": {
            "data": "inputs/sft.json",
            "template": "chat",
            "strict": False,
            "split_train": 0.85,
            "split_val": 0.05,
            "split_seed": 123,
            "batch_size": 4,
            "max_steps": 4,
            "warmup_steps": 1,
            "eval_every": 2,
            "eval_batches": 1,
            "checkpoint_every": 2,
            "log_every": 1,
            "max_new_tokens": 8,
        },
        "dpo": {
            "data": "inputs/dpo.json",
            "batch_size": 4,
            "max_steps": 4,
            "warmup_steps": 1,
            "eval_every": 2,
            "eval_batches": 1,
            "checkpoint_every": 2,
            "log_every": 1,
            "max_new_tokens": 8,
        },
        "classify": {
            "model": "base",
            "batch_size": 8,
            "max_steps": 4,
            "warmup_steps": 1,
            "eval_every": 2,
            "eval_batches": 1,
            "checkpoint_every": 2,
            "log_every": 1,
        },
        "judge": {"host": "http://127.0.0.1:9", "on_unavailable": "fallback", "timeout_s": 2, "retries": 0},
        "export": {"model": "dpo", "parity_tokens": 8},
        "benchmark": {"limit": 8},
    }


def venv_env() -> dict[str, str]:
    """The environment with this interpreter's bin/ first on PATH, so `python` in dvc.yaml is the venv's."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, check=check, capture_output=True, text=True, env=venv_env())


def make_project(dest: Path, overrides: dict | None = None, corpus: str | None = None) -> Path:
    """A git + DVC repo at ``dest`` with the project's code, tiny params and small local inputs, committed."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    inputs = dest / "inputs"
    inputs.mkdir(exist_ok=True)
    if corpus is None:
        corpus = (
            (SHARED_DATA / "quijote.txt").read_text(encoding="utf-8-sig")[20_000:80_000]
            if SHARED_DATA.is_dir()
            else generated_corpus(60_000)
        )
    (inputs / "corpus.txt").write_text(corpus, encoding="utf-8")
    if SHARED_DATA.is_dir():
        sft = json.loads((SHARED_DATA / "instruction-data.json").read_text())[:60]
        dpo = json.loads((SHARED_DATA / "instruction-data-with-preference.json").read_text())[:60]
    else:
        sft, dpo = generated_instructions(60), generated_instructions(60, seed=1, preferences=True)
    (inputs / "sft.json").write_text(json.dumps(sft))
    (inputs / "dpo.json").write_text(json.dumps(dpo))
    params = merge_params(tiny_params(), overrides or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "config", "user.email", "tests@example.invalid"], dest)
    run(["git", "config", "user.name", "tests"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "test project"], dest)
    return dest
