"""LoRA against full fine-tuning: speed, memory, optimizer state, checkpoint size and validation loss.

    python -m bench.lora                                  # cpu-medium (default preset) and gpt2-124m
    python -m bench.lora --presets cpu-medium --steps 30 --base models/base

Each (preset, method) pair runs SFT through the real loop (pipeline.train.loop) in its own process, so peak RSS is
that run's alone; the same seed, data, batches, lr and number of steps for both methods. ``--base`` starts from
trained weights (it must match the preset's shape); otherwise the model is the seeded random init, where the
memory and speed figures hold but the loss gap says little. Tokens/s: the loop's, first log window left out.
Optimizer state: the bytes of every tensor in the saved AdamW state. Checkpoint: the bytes of the whole
checkpoint directory. The last line is a ``key=value`` summary of the ratios LoRA / full.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from bench.finetune import records, tokenizer
from pipeline.common.config import LoRAParams, load_params
from pipeline.data.instructions import Example, split_dataset, tokenize_examples
from pipeline.model import lora
from pipeline.model.checkpoint import load_model
from pipeline.model.gpt import GPT, config_from_preset
from pipeline.train import resume
from pipeline.train.loop import train
from pipeline.train.objectives import SFTObjective

ROOT = Path(__file__).resolve().parents[1]


def one_run(preset: str, method: str, steps: int, rank: int, base: str | None) -> dict:
    """SFT for ``steps`` steps with ``method`` (full | lora) in this process; the measurements."""
    torch.manual_seed(1337)
    p = load_params(ROOT / "params.yaml").sft
    sft, _ = records()
    enc = tokenizer(4096, sft)
    model = (
        load_model(base)[0].train()
        if base
        else GPT(config_from_preset(preset, vocab_size=max(4096, enc.n_vocab)))
    )
    examples = [Example(i, r["instruction"], r.get("input", ""), r["output"]) for i, r in enumerate(sft)]
    train_set, val_set, _ = split_dataset(examples, p.split_train, p.split_val, p.split_seed, "sft")
    ctx = min(model.cfg.context_length, 256)
    train_data, val_data = (tokenize_examples(enc, s, p.template, ctx) for s in (train_set, val_set))
    objective = SFTObjective(
        train_data,
        val_data,
        batch_size=p.batch_size,
        grad_accum=1,
        eval_batches=4,
        context_length=ctx,
        pad_id=enc.eot_token,
        mask_prompt=True,
        seed=p.seed,
    )
    if method == "lora":
        lora.apply_lora(model, LoRAParams(rank=rank, alpha=2.0 * rank), "bench.lora", seed=p.seed)
    params = replace(
        p,
        max_steps=steps,
        warmup_steps=2,
        log_every=max(1, steps // 4),
        eval_every=steps,
        checkpoint_every=steps,
        keep_checkpoints=1,
        eval_batches=4,
        nproc_per_node=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = train(
            model,
            objective,
            params,
            checkpoint_dir=Path(tmp) / "ckpt",
            report_dir=Path(tmp) / "r",
            desc=f"{preset} {method}",
        )
        checkpoint = resume.list_checkpoints(Path(tmp) / "ckpt")[0]
        ckpt_bytes = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
        trainer = torch.load(checkpoint / resume.TRAINER, weights_only=True)
    optimizer_bytes = sum(
        t.numel() * t.element_size()
        for state in trainer["optimizer"]["state"].values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    m = result.metrics
    return {
        "preset": preset,
        "method": method,
        "steps": steps,
        "tokens_per_s": m["summary/tokens_per_s"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "optimizer_mb": optimizer_bytes / 1e6,
        "checkpoint_mb": ckpt_bytes / 1e6,
        "val_loss": m["val/loss"],
        "trainable": m["summary/trainable_params"],
        "trainable_share": m["summary/trainable_share"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="cpu-medium,gpt2-124m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--base", default=None, help="trained model directory for the first preset")
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one, args.steps, args.rank, args.base)))
        return
    rows, summary = [], []
    for i, preset in enumerate(args.presets.split(",")):
        for method in ("full", "lora"):
            cmd = [
                sys.executable,
                "-m",
                "bench.lora",
                "--one",
                preset,
                method,
                "--steps",
                str(args.steps),
                "--rank",
                str(args.rank),
            ] + (["--base", args.base] if args.base and i == 0 else [])
            done = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
            )
            if done.returncode:
                sys.exit(done.stderr[-2000:])
            rows.append(json.loads(done.stdout.splitlines()[-1]))
        full, low = rows[-2], rows[-1]
        summary += [
            f"{preset}_{k}={low[k] / full[k]:.3f}"
            for k in ("tokens_per_s", "peak_rss_mb", "optimizer_mb", "checkpoint_mb", "val_loss")
        ]
    print(
        f"| preset | method | trainable | tokens/s | peak RSS MB | optimizer MB | checkpoint MB | val loss @{args.steps} |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['method']} | {r['trainable']:,.0f} ({r['trainable_share']:.2%}) | "
            f"{r['tokens_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} | {r['optimizer_mb']:.2f} | "
            f"{r['checkpoint_mb']:.2f} | {r['val_loss']:.4f} |"
        )
    print(" ".join(summary))


if __name__ == "__main__":
    main()
