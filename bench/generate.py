"""Decode speed: the KV-cache generator vs the textbook loop that re-runs the whole sequence each step.

    python -m bench.generate [--preset gpt2-124m] [--prompt 16] [--new 200] [--threads 2]

Batch 1, random weights, greedy (both paths must produce the same tokens, which is checked).
Last line: key=value summary with kv_speedup.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from pipeline.model.generate import generate, generate_without_cache
from pipeline.model.gpt import GPT, config_from_preset
from pipeline.model.sampling import SamplingOptions


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(config_from_preset(args.preset, dropout=0.0)).eval()
    prompt = torch.randint(0, model.cfg.vocab_size, (1, args.prompt))
    opts = SamplingOptions(max_new_tokens=args.new, temperature=0)
    generate(model, prompt, SamplingOptions(max_new_tokens=4, temperature=0))  # warm-up

    kv_s, kv_out = timed(lambda: generate(model, prompt, opts))
    naive_s, naive_out = timed(lambda: generate_without_cache(model, prompt, args.new))
    if not torch.equal(kv_out, naive_out):
        sys.exit("error: KV-cache and no-cache greedy decoding disagree")
    kv_tps, naive_tps = args.new / kv_s, args.new / naive_s
    print(
        f"model {args.preset}: {model.num_params(non_embedding=False) / 1e6:.1f}M params, "
        f"batch 1, prompt {args.prompt}, {args.new} new tokens, {args.threads} threads"
    )
    print(f"textbook loop (full recompute): {naive_s:7.2f} s  {naive_tps:7.1f} tok/s")
    print(f"KV-cache generator            : {kv_s:7.2f} s  {kv_tps:7.1f} tok/s")
    print(
        f"preset={args.preset} kv_tok_s={kv_tps:.1f} naive_tok_s={naive_tps:.1f} kv_speedup={kv_tps / naive_tps:.2f}"
    )


if __name__ == "__main__":
    main()
