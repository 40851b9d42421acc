"""Decode speed of one model in every runtime we ship: llama.cpp (GGUF f16, q8_0) beside onnxruntime (fp32, int8)
and torch, batch 1, greedy, in the same run.

    python -m bench.gguf                    # the params.yaml model shape and gpt2-124m, random weights
    python -m bench.gguf --rounds 5 --threads 2

Each round every runtime decodes NEW_TOKENS tokens after a PROMPT-token prompt, in one block, the runtimes in a
fresh random order (``bench.export.in_blocks``); the per-token time is the median gap between tokens over all
rounds, and tokens/s its inverse. llama.cpp runs through llama-cpp-python (``Llama.eval`` one token at a time,
argmax of the logits: the same greedy loop as ours). Weights are random — speed does not depend on them — but
the GGUF files carry a real tokenizer: the default shape's is a bpe tokenizer trained here on the shared corpus
(or generated text), gpt2-124m's GPT-2's own (with our 15 extra special tokens: vocabulary 50272).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.export import decode_ms, in_blocks, onnx_dir, random_model
from pipeline.common.config import load_params
from pipeline.data.tokenizer import gpt2, train_bpe
from pipeline.export.gguf import GGUFTokenizer, write_gguf
from pipeline.export.onnx import write_variants
from pipeline.export.onnx_generate import OnnxGenerator
from pipeline.model.generate import stream_tokens
from pipeline.model.gpt import PRESETS, GPTConfig
from pipeline.model.sampling import SamplingOptions
from pipeline.train.pretrain_setup import model_config

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEW_TOKENS = 64, 32
GGUF_TYPES = ("f16", "q8_0")


def llama_stream(llm, prompt: list[int], tokens: int) -> Iterator[int]:
    """Greedy decoding in llama.cpp: the prompt in one eval, then one token per eval."""
    llm.reset()
    llm.eval(prompt)
    for _ in range(tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        yield token
        llm.eval([token])


def tokenizer_for(cfg: GPTConfig):
    if cfg.vocab_size > 40_000:
        return gpt2(), "gpt2"
    corpus = ROOT.parent / "shared/data/quijote.txt"
    if corpus.is_file():
        text = corpus.read_text(encoding="utf-8-sig")[:2_000_000]
    else:
        from tests.helpers.project import generated_corpus

        text = generated_corpus(2_000_000)
    return train_bpe([text], cfg.vocab_size), "bpe"


def bench_shape(cfg: GPTConfig, rounds: int, threads: int, opset: int) -> dict:
    from llama_cpp import Llama

    from pipeline.export.gguf_check import no_weight_repacking

    enc, kind = tokenizer_for(cfg)
    model = random_model(replace(cfg, vocab_size=enc.n_vocab))
    prompt = np.random.default_rng(0).integers(0, enc.n_vocab, PROMPT).tolist()
    greedy = SamplingOptions(max_new_tokens=NEW_TOKENS + 1, temperature=0)
    tokenizer = GGUFTokenizer.of(enc, kind, enc.n_vocab)
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        variants = write_variants(model, Path(tmp), opset, int8=True)
        gens = {
            v: OnnxGenerator(onnx_dir(Path(tmp), model, opset, variants), v, threads=threads)
            for v in variants
        }
        llamas, sizes = {}, {}
        for gguf_type in GGUF_TYPES:
            path = Path(tmp) / f"bench-{gguf_type}.gguf"
            write_gguf(model, tokenizer, None, path, gguf_type, "bench")
            sizes[gguf_type] = path.stat().st_size / 1e6
            with no_weight_repacking():  # the AMX repack of q8_0 segfaults (docs/export.md)
                llamas[gguf_type] = Llama(
                    model_path=str(path),
                    n_ctx=cfg.context_length,
                    n_threads=threads,
                    n_threads_batch=threads,
                    verbose=False,
                )
        decode: dict[str, list[float]] = {}
        for round_ in range(rounds):
            streams = {
                "torch": stream_tokens(model, torch.tensor([prompt]), greedy),
                "ort_fp32": gens["fp32"].stream(prompt, greedy),
                "ort_int8": gens["int8"].stream(prompt, greedy),
            }
            streams |= {
                f"llama.cpp_{t}": llama_stream(llm, prompt, NEW_TOKENS + 1) for t, llm in llamas.items()
            }
            for name, gaps in in_blocks(streams, NEW_TOKENS + 1, seed=round_).items():
                decode.setdefault(name, []).extend(decode_ms(gaps, NEW_TOKENS))
        for llm in llamas.values():
            llm.close()
    return {
        "params_m": model.num_params(non_embedding=False) / 1e6,
        "vocab": enc.n_vocab,
        "gguf_mb": sizes,
        "decode_ms": {k: statistics.median(v) for k, v in decode.items()},
    }


def report(name: str, r: dict) -> None:
    sizes = ", ".join(f"{t} {mb:.1f} MB" for t, mb in r["gguf_mb"].items())
    print(f"\n{name}: {r['params_m']:.1f}M params, vocabulary {r['vocab']}, GGUF {sizes}")
    print(f"{'runtime':<18}{'ms/token':>10}{'tokens/s':>10}{'vs torch':>10}")
    torch_ms = r["decode_ms"]["torch"]
    for key, ms in r["decode_ms"].items():
        print(f"{key:<18}{ms:>10.2f}{1e3 / ms:>10.1f}{torch_ms / ms:>9.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--opset", type=int, default=23)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    default = model_config(params.model, params.tokenizer.vocab_size)
    print(
        f"decode after a {PROMPT}-token prompt, {NEW_TOKENS} tokens, batch 1, {args.threads} threads, "
        f"{args.rounds} rounds"
    )
    summary = {}
    for name, cfg in (("default (params.yaml)", default), ("gpt2-124m", PRESETS["gpt2-124m"])):
        result = bench_shape(cfg, args.rounds, args.threads, args.opset)
        report(name, result)
        summary |= {f"{name.split()[0]}_{k}_tok_s": round(1e3 / v, 1) for k, v in result["decode_ms"].items()}
    print("\n" + " ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
