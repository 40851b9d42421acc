"""Decode latency with a KV cache, batch 1: torch eager vs onnxruntime fp32 vs int8, against the bandwidth floor.

    python -m bench.export                      # the params.yaml model shape and gpt2-124m, random weights
    python -m bench.export --threads 1 --rounds 5
    python -m bench.export --graphs             # gpt2-124m: our graph vs opset 18, ORT's GPT-2 fusions, legacy

Decoding one token reads every weight once, so it is bound by memory bandwidth. The machine's read bandwidth
is measured in the same run — a sum over a 1 GiB tensor, with the same threads as the models — and the floor
is weight bytes ÷ bandwidth: the fp32 bytes for torch and onnxruntime fp32, the int8 file's bytes for int8.
The host's bandwidth drifts (28–74 GB/s between runs here), so the work goes in rounds: in each, every variant
decodes its tokens in one block (the real generators: ``pipeline.model.generate.stream_tokens`` and
``OnnxGenerator.stream``), the probes read in blocks of their own, in a fresh random order; a variant's ratio to
the floor is taken within each round, against that round's bandwidth, and its median over rounds is reported.
Blocks rather than token-by-token turns: alternating single tokens left every other thread pool's workers
spinning on the 2 cores and doubled onnxruntime's time per token. Per-token latency is the median gap between
tokens, prefill the time to the first token of a 256-token prompt (capped by the context).
``ort_fp32_concat`` decodes through the grow-by-concat cache graph the stage used before (``bench.concat_cache``:
the cache copied every step, handed through numpy); the ``_long`` rows decode after an 896-token prompt (capped
by the context): what a long cache costs each design. Weights are random: latency does not depend on them. The
last line is a ``key=value`` summary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from bench.concat_cache import concat_greedy_stream, concat_session, export_concat_graph
from pipeline.common.atomic import write_json
from pipeline.common.config import load_params
from pipeline.export.onnx import export_graph, onnx_config, write_variants
from pipeline.export.onnx_generate import VARIANT_FILES, OnnxGenerator, session_options
from pipeline.model.checkpoint import CONFIG
from pipeline.model.generate import stream_tokens
from pipeline.model.gpt import GPT, PRESETS, GPTConfig
from pipeline.model.sampling import SamplingOptions
from pipeline.train.pretrain_setup import model_config

ROOT = Path(__file__).resolve().parents[1]

PROMPT, NEW_TOKENS, PREFILL, LONG = 64, 32, 256, 896


def bandwidth_stream(tensor: torch.Tensor) -> Iterator[int]:
    """Yields the bytes read after each full read of ``tensor``: timed in turn with the decode steps."""
    while True:
        tensor.sum()
        yield tensor.numel() * tensor.element_size()


def matmul_stream(k: int, n: int, threads: int) -> Iterator[int]:
    """Yields the bytes read after each run of one onnxruntime MatMul (1×k · k×n, the vocabulary head's shape):
    the kernel that every decode step is made of, on its own."""
    weight = np.full((k, n), 0.01, np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
    )
    x = np.ones((1, k), np.float32)
    while True:
        session.run(None, {"x": x})
        yield weight.nbytes


def in_blocks(streams: dict[str, Iterator], steps: int, seed: int = 0) -> dict[str, list[float]]:
    """Seconds each stream takes to yield, ``steps`` times in a row, the streams in a random order."""
    gaps: dict[str, list[float]] = {name: [] for name in streams}
    for name in np.random.default_rng(seed).permutation(list(streams)):
        for _ in range(steps):
            start = time.perf_counter()
            next(streams[name])
            gaps[name].append(time.perf_counter() - start)
    return gaps


def decode_ms(gaps: list[float], tokens: int) -> list[float]:
    """Per-token decode times of one stream of ``tokens + 1`` yields (the first is the prefill)."""
    return [g * 1e3 for g in gaps[-tokens:]]


def random_model(cfg: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(replace(cfg, dropout=0.0)).eval()


def onnx_dir(directory: Path, model: GPT, opset: int, variants: dict[str, str]) -> Path:
    write_json(directory / CONFIG, onnx_config(model, opset, variants))
    return directory


def bench_shape(cfg: GPTConfig, rounds: int, threads: int, opset: int, probe: torch.Tensor) -> dict:
    model = random_model(cfg)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, PROMPT).tolist()
    prefill = rng.integers(0, cfg.vocab_size, min(PREFILL, cfg.context_length - 1)).tolist()
    long_prompt = rng.integers(0, cfg.vocab_size, min(LONG, cfg.context_length - NEW_TOKENS - 1)).tolist()
    greedy = SamplingOptions(max_new_tokens=NEW_TOKENS + 1, temperature=0)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        started = time.perf_counter()
        variants = write_variants(model, Path(tmp), opset, int8=True)
        export_s = time.perf_counter() - started
        sizes = {v: (Path(tmp) / f).stat().st_size for v, f in variants.items()}
        gens = {
            v: OnnxGenerator(onnx_dir(Path(tmp), model, opset, variants), v, threads=threads)
            for v in variants
        }
        export_concat_graph(model, Path(tmp) / "concat.onnx", opset)
        concat = concat_session(Path(tmp) / "concat.onnx", threads)

        def streams(ids: list[int], opts: SamplingOptions) -> dict[str, Iterator]:
            return {
                "torch": stream_tokens(model, torch.tensor([ids]), opts),
                "ort_fp32": gens["fp32"].stream(ids, opts),
                "ort_int8": gens["int8"].stream(ids, opts),
            }

        decode: dict[str, list[float]] = {}
        prefill_ms: dict[str, list[float]] = {}
        floor_ratios: dict[str, list[float]] = {}
        read, gemv = [], []
        probes = {"read": bandwidth_stream(probe), "gemv": matmul_stream(cfg.n_embd, cfg.vocab_size, threads)}
        for first in probes.values():
            next(first)  # the first pass pays page faults and prepacking, not bandwidth
        for round_ in range(rounds):
            runs = streams(prompt, greedy) | {
                "ort_fp32_concat": concat_greedy_stream(concat, model, prompt),
                "ort_fp32_long": gens["fp32"].stream(long_prompt, greedy),
                "ort_fp32_concat_long": concat_greedy_stream(concat, model, long_prompt),
            }
            gaps = in_blocks(runs | probes, NEW_TOKENS + 1, seed=round_)
            round_read = statistics.median(probe.numel() * probe.element_size() / g for g in gaps.pop("read"))
            read.append(round_read)
            gemv.append(statistics.median(cfg.n_embd * cfg.vocab_size * 4 / g for g in gaps.pop("gemv")))
            for name, g in gaps.items():
                ms = decode_ms(g, NEW_TOKENS)
                decode.setdefault(name, []).extend(ms)
                floor_bytes = sizes["int8"] if name == "ort_int8" else weight_bytes
                floor_ratios.setdefault(name, []).append(
                    statistics.median(ms) / (floor_bytes / round_read * 1e3)
                )
            for name, g in in_blocks(
                streams(prefill, SamplingOptions(max_new_tokens=1, temperature=0)), 1
            ).items():
                prefill_ms.setdefault(name, []).append(g[0] * 1e3)
    bandwidth, gemv_bandwidth = statistics.median(read), statistics.median(gemv)
    return {
        "params_m": model.num_params(non_embedding=False) / 1e6,
        "export_s": export_s,
        "weights_mb": weight_bytes / 1e6,
        "fp32_mb": sizes["fp32"] / 1e6,
        "int8_mb": sizes["int8"] / 1e6,
        "bandwidth_gbs": bandwidth / 1e9,
        "bandwidth_range_gbs": (min(read) / 1e9, max(read) / 1e9),
        "gemv_gbs": gemv_bandwidth / 1e9,
        "floor_ms": {"fp32": weight_bytes / bandwidth * 1e3, "int8": sizes["int8"] / bandwidth * 1e3},
        "decode_ms": {k: statistics.median(v) for k, v in decode.items()},
        "floor_ratio": {k: statistics.median(v) for k, v in floor_ratios.items()},
        "floor_ratio_range": {k: (min(v), max(v)) for k, v in floor_ratios.items()},
        "prefill_ms": {k: statistics.median(v) for k, v in prefill_ms.items()},
        "prefill_tokens": len(prefill),
        "long_tokens": len(long_prompt),
        "n_embd": cfg.n_embd,
        "vocab": cfg.vocab_size,
    }


def report(name: str, r: dict) -> None:
    print(
        f"\n{name}: {r['params_m']:.1f}M params, weights {r['weights_mb']:.1f} MB, ONNX fp32 {r['fp32_mb']:.1f} MB, "
        f"int8 {r['int8_mb']:.1f} MB (export + quantize {r['export_s']:.1f} s)"
    )
    low, high = r["bandwidth_range_gbs"]
    print(
        f"read bandwidth {r['bandwidth_gbs']:.1f} GB/s (rounds: {low:.1f}–{high:.1f}) → floor fp32 "
        f"{r['floor_ms']['fp32']:.2f} ms/token, int8 {r['floor_ms']['int8']:.2f} ms/token; decode after a "
        f"{PROMPT}-token prompt (_long: after {r['long_tokens']})"
    )
    print(
        f"one onnxruntime MatMul of the head's shape (1×{r['n_embd']} · {r['n_embd']}×{r['vocab']}) reads "
        f"{r['gemv_gbs']:.1f} GB/s = {r['gemv_gbs'] / r['bandwidth_gbs']:.0%} of the sum's bandwidth"
    )
    prefill_header = f"prefill {r['prefill_tokens']} ms"
    print(
        f"{'variant':<22}{'decode ms/token':>16}{'× floor':>9}{'range over rounds':>19}"
        f"{'speedup vs torch':>18}{prefill_header:>16}"
    )
    torch_ms = r["decode_ms"]["torch"]
    for key, ms in r["decode_ms"].items():
        low, high = r["floor_ratio_range"][key]
        prefill = r["prefill_ms"].get(key)
        print(
            f"{key:<22}{ms:>16.2f}{r['floor_ratio'][key]:>9.2f}{f'{low:.2f}–{high:.2f}':>19}{torch_ms / ms:>18.2f}"
            f"{'' if prefill is None else f'{prefill:.1f}':>16}"
        )


def compare_graphs(cfg: GPTConfig, rounds: int, threads: int, opset: int) -> dict:
    """fp32 decode of the same model as differently exported graphs, each decoding its tokens in a block."""
    model = random_model(cfg)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, PROMPT).tolist()
    greedy = SamplingOptions(max_new_tokens=NEW_TOKENS + 1, temperature=0)
    builders = {
        f"shared buffers, dynamo opset {opset} (ours)": lambda p: export_graph(model, p, opset),
        "shared buffers, dynamo opset 18": lambda p: export_graph(model, p, 18),
        f"concat cache, dynamo opset {opset}": lambda p: export_concat_graph(model, p, opset),
        "concat cache, legacy opset 18": lambda p: export_concat_graph(model, p, 18, dynamo=False),
    }
    results, streams = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-graphs-") as tmp:
        for i, (name, build) in enumerate(builders.items()):
            directory = Path(tmp) / str(i)
            directory.mkdir()
            path = directory / VARIANT_FILES["fp32"]
            build(path)
            results[name] = {"mb": path.stat().st_size / 1e6, "nodes": len(onnx.load(str(path)).graph.node)}
            if name.startswith("concat"):
                session = concat_session(path, threads)
                streams[name] = lambda session=session: concat_greedy_stream(session, model, prompt)
            else:
                gen = OnnxGenerator(onnx_dir(directory, model, opset, {"fp32": path.name}), "fp32", threads)
                streams[name] = lambda gen=gen: gen.stream(prompt, greedy)
        times: dict[str, list[float]] = {name: [] for name in streams}
        for round_ in range(rounds):
            gaps = in_blocks({name: start() for name, start in streams.items()}, NEW_TOKENS + 1, round_)
            for name, g in gaps.items():
                times[name] += decode_ms(g, NEW_TOKENS)
    for name in results:
        results[name]["ms"] = statistics.median(times[name])
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["default", "gpt2-124m"],
        help="'default' (params.yaml model) and/or preset names",
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--graphs", action="store_true", help="compare exports of gpt2-124m (fp32) instead")
    args = parser.parse_args(argv)
    params = load_params(ROOT / "params.yaml")
    opset = params.export.opset
    torch.set_num_threads(args.threads)
    print(
        f"threads {args.threads}, rounds {args.rounds}, prompt {PROMPT} + {NEW_TOKENS} new tokens, "
        f"onnx opset {opset}"
    )
    if args.graphs:
        results = compare_graphs(PRESETS["gpt2-124m"], args.rounds, args.threads, opset)
        ours = next(iter(results.values()))["ms"]
        print("\ngpt2-124m fp32 decode, batch 1")
        print(f"{'graph':<42}{'file MB':>9}{'nodes':>7}{'ms/token':>10}{'× ours':>8}")
        for name, r in results.items():
            print(f"{name:<42}{r['mb']:>9.1f}{r['nodes']:>7}{r['ms']:>10.2f}{r['ms'] / ours:>8.2f}")
        keys = ["ours", "opset18", "concat", "concat_legacy"]
        print(
            " ".join(
                f"{k}_ms={r['ms']:.2f} {k}_mb={r['mb']:.1f}"
                for k, r in zip(keys, results.values(), strict=False)
            )
        )
        return
    summary = {}
    for shape in args.shapes:
        cfg = (
            model_config(params.model, params.tokenizer.vocab_size) if shape == "default" else PRESETS[shape]
        )
        tag = "default" if shape == "default" else shape.replace("gpt2-", "")
        r = bench_shape(
            cfg, args.rounds, args.threads, opset, torch.ones(256 * 1024 * 1024)
        )  # 1 GiB ≫ caches
        report(f"{shape} ({params.model.preset})" if shape == "default" else shape, r)
        d = r["decode_ms"]
        summary |= {f"{k}_ms_{tag}": round(v, 2) for k, v in d.items()}
        summary |= {
            f"prefill{r['prefill_tokens']}_{k}_ms_{tag}": round(v, 1) for k, v in r["prefill_ms"].items()
        }
        summary |= {
            f"floor_ms_{tag}": round(r["floor_ms"]["fp32"], 2),
            f"bandwidth_gbs_{tag}": round(r["bandwidth_gbs"], 1),
            f"fp32_mb_{tag}": round(r["fp32_mb"], 1),
            f"int8_mb_{tag}": round(r["int8_mb"], 1),
            f"ort_int8_speedup_{tag}": round(d["torch"] / d["ort_int8"], 2),
        }
        if shape == "gpt2-124m":
            summary["ort_fp32_floor_ratio"] = round(r["floor_ratio"]["ort_fp32"], 3)
            summary["gemv_gbs_124m"] = round(r["gemv_gbs"], 1)
            gemv_floor_ms = r["weights_mb"] / r["gemv_gbs"]  # MB / (GB/s) = ms
            summary["ort_fp32_gemv_ratio"] = round(d["ort_fp32"] / gemv_floor_ms, 3)
            summary["ort_int8_floor_ratio"] = round(r["floor_ratio"]["ort_int8"], 3)
            summary["torch_floor_ratio"] = round(r["floor_ratio"]["torch"], 3)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
