"""The book's chapter 7 profile (params-book.yaml) for a few SFT steps, offline: a random GPT-2 medium checkpoint
built locally with transformers stands in for the Hub's, so the real stages run (download → tokenize → pretrain
with model.init_from → sft) at the real shape, and the SFT step time is measured.

    python -m bench.book_profile                 # GPT-2 medium's shape (355M), 3 SFT steps of batch 8
    python -m bench.book_profile --layers 2      # a quick check of the path

Only what a CPU cannot afford is cut: pretrain evaluates one window, SFT evaluates one batch and answers the
held-out prompts with 4 tokens. Everything else is params-book.yaml as it stands (fp32, batch 8, lr 5e-5 …).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from tests.helpers.project import make_project, venv_env

ROOT = Path(__file__).resolve().parents[1]


def random_gpt2_medium(directory: Path, layers: int) -> None:
    """GPT-2 medium's config (1024 wide, 16 heads, context 1024, vocab 50257) with random weights, save_pretrained."""
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=1024, n_head=16, n_layer=layers)).save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    book = yaml.safe_load((ROOT / "params-book.yaml").read_text())
    with tempfile.TemporaryDirectory(prefix="book-profile-") as tmp:
        checkpoint = Path(tmp) / "gpt2-medium-random"
        random_gpt2_medium(checkpoint, args.layers)
        book["model"].update(init_from=str(checkpoint), context_length=None)  # the shape is the checkpoint's
        book["pretrain"].update(batch_size=1, eval_batches=1)
        book["sft"].update(
            max_steps=args.steps, eval_every=args.steps, eval_batches=1, log_every=1, max_new_tokens=4
        )
        book["judge"] = {}
        root = make_project(Path(tmp) / "project", overrides=book)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "repro", "sft"],
            cwd=root,
            capture_output=True,
            text=True,
            env={**venv_env(), "TQDM_DISABLE": "1"},
        )
        if done.returncode:
            sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
        wall = time.perf_counter() - start
        metrics = json.loads((root / "reports/sft/metrics.json").read_text())
        summary, train = metrics["summary"], metrics["train"]
        n_params = sum(p.numel() for p in GPT2LMHeadModel.from_pretrained(checkpoint).parameters())
    steps = args.steps
    tokens_per_step = train["tokens_seen"] / steps
    print(
        f"book profile: GPT-2 medium shape ({args.layers} layers, {n_params / 1e6:.0f}M params), fp32, SFT batch 8, "
        f"{steps} steps; threads {torch.get_num_threads()}"
    )
    print(
        f"sft: {summary['train_seconds'] / steps:.1f} s/step over all steps, {tokens_per_step / summary['tokens_per_s']:.1f} "
        f"s/step after the first ({summary['tokens_per_s']:.0f} tokens/s, {tokens_per_step:.0f} tokens/step); "
        f"whole repro download..sft {wall:.0f} s"
    )


if __name__ == "__main__":
    main()
