"""SFT and DPO training throughput on the default CPU profile, and what caching the DPO reference saves.

    python -m bench.finetune                 # default preset and params.yaml's sft/dpo batch and dtype
    python -m bench.finetune --steps 40 --rounds 3

Both objectives run through the real loop (pipeline.train.loop) on the shared instruction data (or generated
records when ../shared/data is absent), tokenized as the stages do. Tokens/s (every position computed, padding
included, first log window left out) is the loop's, median of ``--rounds`` runs. The DPO baseline is the same
objective recomputing the frozen reference's log-probs at every step (what a naive DPO does) instead of reading
the cache built once before training: the two take full training steps on the same batches alternately, in this
process, so both meet the same load on a shared machine; the saving is the median over those step pairs.
The last line is a ``key=value`` summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.common.config import load_params
from pipeline.data.instructions import (
    Example,
    PreferencePair,
    split_dataset,
    tokenize_examples,
    tokenize_pairs,
)
from pipeline.data.tokenizer import load_tokenizer, train_bpe
from pipeline.model.gpt import GPT, config_from_preset
from pipeline.model.runtime import autocast, resolve_dtype
from pipeline.train.loop import make_optimizer, train
from pipeline.train.losses import sequence_logprobs
from pipeline.train.objectives import DPOObjective, SFTObjective, reference_logprobs
from tests.helpers.project import SHARED_DATA, generated_instructions

ROOT = Path(__file__).resolve().parents[1]


class RecomputingDPO(DPOObjective):
    """The baseline: the frozen reference runs a forward pass on every batch, every step."""

    def __init__(self, reference: GPT, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference

    def loss(self, model, batch):
        with torch.no_grad():
            logits, _ = self.reference(batch["input_ids"])
            ref = sequence_logprobs(logits, batch["targets"], self.reduction)
        return super().loss(model, {**batch, "ref_logps": ref})


def records() -> tuple[list[dict], list[dict]]:
    if SHARED_DATA.is_dir():
        return (
            json.loads((SHARED_DATA / "instruction-data.json").read_text()),
            json.loads((SHARED_DATA / "instruction-data-with-preference.json").read_text()),
        )
    return generated_instructions(1100), generated_instructions(1100, seed=1, preferences=True)


def tokenizer(vocab_size: int, sft: list[dict]):
    if (ROOT / "data/tokenizer/metadata.json").is_file():
        return load_tokenizer(ROOT / "data/tokenizer")
    return train_bpe([f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in sft], vocab_size)


def run(model: GPT, objective, params, warmup: int, steps: int) -> dict[str, float]:
    params = replace(
        params,
        max_steps=warmup + steps,
        log_every=warmup,
        eval_every=10**9,
        eval_batches=1,
        checkpoint_every=10**9,
        nproc_per_node=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = train(
            model,
            objective,
            params,
            checkpoint_dir=Path(tmp) / "ckpt",
            report_dir=Path(tmp) / "report",
            desc="bench",
        )
    return result.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    params = load_params(ROOT / "params.yaml")
    sft_params, dpo_params = params.sft, params.dpo
    sft_records, dpo_records = records()
    enc = tokenizer(params.tokenizer.vocab_size, sft_records)
    cfg = config_from_preset(
        params.model.preset, vocab_size=enc.n_vocab, context_length=params.model.context_length
    )
    context = cfg.context_length
    examples = [Example(i, r["instruction"], r["input"], r["output"]) for i, r in enumerate(sft_records)]
    train_set, val_set, _ = split_dataset(examples, sft_params.split_train, sft_params.split_val, 123, "sft")
    sft_train = tokenize_examples(enc, train_set, "alpaca", context)
    sft_val = tokenize_examples(enc, val_set, "alpaca", context)
    pairs = [
        PreferencePair(i, r["instruction"], r["input"], r["chosen"], r["rejected"])
        for i, r in enumerate(dpo_records)
        if r["chosen"].strip() != r["rejected"].strip()
    ]
    dpo_train = tokenize_pairs(enc, pairs[: len(pairs) * 9 // 10], "alpaca", context)
    dpo_val = tokenize_pairs(enc, pairs[len(pairs) * 9 // 10 :], "alpaca", context)
    device = torch.device("cpu")
    dtype = resolve_dtype(dpo_params.dtype, device)
    print(
        f"preset={params.model.preset} ctx={context} vocab={enc.n_vocab} threads={torch.get_num_threads()} "
        f"dtype={dtype}; sft batch={sft_params.batch_size}, dpo batch={dpo_params.batch_size} pairs "
        f"(= {2 * dpo_params.batch_size} sequences)"
    )

    torch.manual_seed(0)
    base = GPT(cfg)
    common = dict(eval_batches=1, context_length=context, pad_id=enc.eot_token)
    sft = SFTObjective(
        sft_train,
        sft_val,
        batch_size=sft_params.batch_size,
        grad_accum=sft_params.grad_accum,
        mask_prompt=True,
        seed=0,
        **common,
    )
    reference = copy.deepcopy(base).eval()
    start = time.perf_counter()
    cached = {
        name: reference_logprobs(
            reference,
            data,
            context_length=context,
            pad_id=enc.eot_token,
            reduction=dpo_params.reduction,
            batch_size=dpo_params.batch_size,
            autocast=lambda: autocast(device, dtype),
        )
        for name, data in (("train", dpo_train), ("val", dpo_val))
    }
    cache_seconds = time.perf_counter() - start
    dpo_kwargs = dict(
        beta=dpo_params.beta,
        reduction=dpo_params.reduction,
        batch_size=dpo_params.batch_size,
        grad_accum=dpo_params.grad_accum,
        seed=0,
        **common,
    )
    dpo_cached = DPOObjective(dpo_train, dpo_val, cached["train"], cached["val"], **dpo_kwargs)
    dpo_recomputed = RecomputingDPO(
        reference, dpo_train, dpo_val, cached["train"], cached["val"], **dpo_kwargs
    )

    # 1. Throughput through the real loop.
    results: dict[str, list[float]] = {"sft": [], "dpo": []}
    for round_ in range(args.rounds):
        for name, objective, p in (("sft", sft, sft_params), ("dpo", dpo_cached, dpo_params)):
            metrics = run(copy.deepcopy(base), objective, p, args.warmup, args.steps)
            results[name].append(metrics["summary/tokens_per_s"])
            print(
                f"round {round_ + 1} {name:<4} {metrics['summary/tokens_per_s']:>9,.0f} tok/s  "
                f"MFU {metrics['summary/mfu']:.1%}",
                flush=True,
            )
    tok_s = {name: statistics.median(values) for name, values in results.items()}

    # 2. Cached vs recomputed reference: the same batches, steps taken alternately, so both see the same machine.
    cached_s, recomputed_s = paired_step_seconds(
        base, dpo_cached, dpo_recomputed, dpo_params, dtype, args.warmup, args.steps
    )
    saved = statistics.median(1 - c / r for c, r in zip(cached_s, recomputed_s, strict=False))
    step_gain = statistics.median(recomputed_s) - statistics.median(cached_s)
    break_even = cache_seconds / step_gain if step_gain > 0 else float("inf")
    epoch_steps = len(dpo_train) / (dpo_params.batch_size * dpo_params.grad_accum)

    print(
        f"\nSFT  {tok_s['sft']:>9,.0f} tok/s   DPO {tok_s['dpo']:>9,.0f} tok/s  (the loop, median of {args.rounds})"
    )
    print(
        f"DPO step, cached reference     {statistics.median(cached_s) * 1000:7.0f} ms (median of {args.steps})"
    )
    print(f"DPO step, recomputed reference {statistics.median(recomputed_s) * 1000:7.0f} ms")
    print(f"share of DPO step time saved by the cache: {saved:.1%} (median of paired steps)")
    print(
        f"the cache took {cache_seconds:.1f} s for {len(dpo_train) + len(dpo_val)} pairs: it pays for itself after "
        f"{break_even:.0f} steps ({break_even / epoch_steps:.2f} epochs of {len(dpo_train)} training pairs)"
    )
    print(
        f"sft_tokens_per_s={tok_s['sft']:.0f} dpo_tokens_per_s={tok_s['dpo']:.0f} dpo_step_time_saved={saved:.3f} "
        f"cache_build_s={cache_seconds:.1f} cache_break_even_steps={break_even:.0f}"
    )


def paired_step_seconds(
    base: GPT,
    cached: DPOObjective,
    recomputed: RecomputingDPO,
    params,
    dtype: torch.dtype,
    warmup: int,
    steps: int,
) -> tuple[list[float], list[float]]:
    """Seconds of a full training step (forward, backward, clipping, AdamW) for each variant on the same batches.

    The two variants alternate step by step (and which goes first alternates too), each with its own copy of the
    model and optimizer, so drift in the shared machine's speed hits both alike.
    """
    device = torch.device("cpu")
    runs = {}
    for name, objective in (("cached", cached), ("recomputed", recomputed)):
        model = copy.deepcopy(base).train()
        runs[name] = (objective, model, make_optimizer(model, params, device), [])
    for step in range(warmup + steps):
        order = ["cached", "recomputed"] if step % 2 == 0 else ["recomputed", "cached"]
        for name in order:
            objective, model, optimizer, times = runs[name]
            start = time.perf_counter()
            batch = objective.train_batch(step, 0, 0, 1)
            with autocast(device, dtype):
                loss, _ = objective.loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= warmup:
                times.append(time.perf_counter() - start)
    return runs["cached"][3], runs["recomputed"][3]


if __name__ == "__main__":
    main()
