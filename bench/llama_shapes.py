"""Time per SFT step at the Llama family's real shapes (their whole vocabulary included), through the real loop.

    python -m bench.llama_shapes                                   # smollm2-135m full and LoRA, qwen3-0.6b LoRA
    python -m bench.llama_shapes --runs qwen3-0.6b:lora --steps 4

Each (preset, method) runs in its own process (peak RSS is that run's alone), from the preset's seeded random
init — the speed and memory of a step do not depend on the weights — on the book's instruction data tokenized
with a 4,096-token BPE (ids inside every preset's vocabulary), with params.yaml's sft batch size, lr and dtype
choice, and the profiles' AdamW and context. LoRA: rank 16 on attention and MLP, alpha 32. Seconds per step: the
loop's tokens/s (first log window left out) turned back into steps.
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
from pipeline.model.gpt import GPT, PRESETS
from pipeline.train.loop import train
from pipeline.train.objectives import SFTObjective

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 512  # the profiles' sft context


def one_run(preset: str, method: str, steps: int, batch: int | None) -> dict:
    torch.manual_seed(1337)
    p = load_params(ROOT / "params.yaml").sft
    p = replace(p, batch_size=batch or p.batch_size, optimizer="adamw")  # the profiles fine-tune with AdamW
    sft, _ = records()
    enc = tokenizer(4096, sft)
    model = GPT(replace(PRESETS[preset], context_length=CONTEXT))
    examples = [Example(i, r["instruction"], r.get("input", ""), r["output"]) for i, r in enumerate(sft)]
    train_set, val_set, _ = split_dataset(examples, p.split_train, p.split_val, p.split_seed, "sft")
    train_data, val_data = (tokenize_examples(enc, s, p.template, CONTEXT) for s in (train_set, val_set))
    objective = SFTObjective(
        train_data,
        val_data,
        batch_size=p.batch_size,
        grad_accum=1,
        eval_batches=1,
        context_length=CONTEXT,
        pad_id=enc.eot_token,
        mask_prompt=True,
        seed=p.seed,
    )
    if method == "lora":
        lora.apply_lora(model, LoRAParams(rank=16, alpha=32.0), "bench.llama_shapes", seed=p.seed)
    params = replace(
        p,
        max_steps=steps,
        warmup_steps=1,
        log_every=1,
        eval_every=steps,
        checkpoint_every=steps,
        keep_checkpoints=1,
        eval_batches=1,
        nproc_per_node=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = train(
            model, objective, params, checkpoint_dir=Path(tmp) / "c", report_dir=Path(tmp) / "r", desc=preset
        )
    m = result.metrics
    tokens_per_step = p.batch_size * CONTEXT
    return {
        "preset": preset,
        "method": method,
        "params": model.num_params(non_embedding=False),
        "trainable": m["summary/trainable_params"],
        "tokens_per_s": m["summary/tokens_per_s"],
        "s_per_step": tokens_per_step / m["summary/tokens_per_s"],
        "batch": f"{p.batch_size}×{CONTEXT}",
        "dtype": "bf16" if m["summary/bf16"] else "fp32",
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="smollm2-135m:full,smollm2-135m:lora,qwen3-0.6b:lora")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--batch", type=int, default=None, help="sequences per step (default: params.yaml's sft)"
    )
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one, args.steps, args.batch)))
        return
    print("| preset | method | parameters | trainable | batch | dtype | s/step | tokens/s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs.split(","):
        preset, method = run.split(":")
        cmd = [
            sys.executable,
            "-m",
            "bench.llama_shapes",
            "--one",
            preset,
            method,
            "--steps",
            str(args.steps),
        ] + (["--batch", str(args.batch)] if args.batch else [])
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
        )
        if done.returncode:  # negative: killed by a signal (the kernel's OOM killer leaves no stderr)
            sys.exit(f"{run}: exit {done.returncode} {done.stderr[-2000:]}")
        r = json.loads(done.stdout.splitlines()[-1])
        print(
            f"| {r['preset']} | {r['method']} | {r['params']:,} | {r['trainable']:,.0f} | {r['batch']} | {r['dtype']} | "
            f"{r['s_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
