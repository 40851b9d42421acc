"""ONNX export: one KV-cache graph for prefill and decode, parity-checked against torch, int8 beside it.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export → onnxscript), chosen over the legacy TorchScript
exporter because the legacy one is deprecated since torch 2.9 and stores a tied embedding twice (the head as a
pre-transposed copy; sizes in BENCHMARKS.md), while the dynamo graph keeps one initializer and a
Transpose that onnxruntime folds at load.

KV cache: fixed-size buffers that onnxruntime's ``GroupQueryAttention`` (com.microsoft contrib op, with the
model's key/value heads: as many as query heads is plain multi-head attention) writes the new keys and values into, at the position the
``past_length`` input gives; the generator binds each present output to its past input, so a decode step
writes one position instead of copying the cache as a grow-by-concat graph does (compared in BENCHMARKS.md).
The traced module (``SharedCacheGPT``) runs the GPT's own layers and weights; only attention is the contrib op,
written with ``torch.onnx.ops.symbolic_multi_out``.
The graph therefore needs onnxruntime (other ONNX runtimes lack the contrib op).

Opset: 23 by default (18–25 accepted; the dynamo exporter writes nothing below 18): from 20 GELU is one ONNX
op; BENCHMARKS.md compares the opsets.

Everything is built in a temp directory and renamed onto ``models/onnx`` only after every check passed, so a
failed parity check leaves no exported files behind.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from pipeline.common.atomic import atomic_path, write_json
from pipeline.common.config import ExportParams
from pipeline.common.errors import PipelineError, quiet_logger
from pipeline.common.hashing import sha256_file
from pipeline.data.shards import ShardDataset
from pipeline.export.onnx_classifier import export_classifier
from pipeline.export.onnx_generate import (
    INPUT_IDS,
    LOGITS,
    PAST_LENGTH,
    TOKENIZER_DIR,
    VARIANT_FILES,
    OnnxCache,
    OnnxGenerator,
    past_names,
    present_names,
)
from pipeline.model.checkpoint import CONFIG, load_with_tokenizer, read_model_config
from pipeline.model.generate import stream_tokens
from pipeline.model.gpt import GPT, KVCache
from pipeline.model.sampling import SamplingOptions

SUPPORTED_OPSETS = range(18, 26)
EXPORTER = "torch.onnx.export(dynamo=True)"
MODEL_CARD = "README.md"
REAL_WINDOWS = 8  # validation windows of context_length tokens: the real prompts


class SharedCacheGPT(torch.nn.Module):
    """The GPT traced for export: its embeddings, blocks and head, with attention as onnxruntime's
    GroupQueryAttention over fixed-size KV buffers (``past_length`` positions filled, new ones written after).

    Only for tracing: run eagerly, the symbolic attention op returns placeholders, not attention.
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, past_length: torch.Tensor, *cache: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        model, cfg = self.model, self.model.cfg
        batch, length = input_ids.shape
        total = past_length + length
        seqlens_k = (
            (total - 1).to(torch.int32).expand(batch)
        )  # the op's convention: last filled index per row
        total32 = total.to(torch.int32)
        x = model.embed(input_ids, past_length)
        present: list[torch.Tensor] = []
        for i, block in enumerate(model.blocks):
            q, k, v = (z.flatten(2) for z in block.att.project(block.norm1(x), past_length))
            past_key, past_value = cache[2 * i], cache[2 * i + 1]
            y, key, value = torch.onnx.ops.symbolic_multi_out(
                "com.microsoft::GroupQueryAttention",
                (q, k, v, past_key, past_value, seqlens_k, total32),
                {
                    "num_heads": cfg.n_head,
                    "kv_num_heads": cfg.kv_heads,
                    "scale": 1.0 / math.sqrt(cfg.head_dim),
                },
                dtypes=(q.dtype, past_key.dtype, past_value.dtype),
                shapes=(q.shape, past_key.shape, past_value.shape),
                version=1,
            )
            x = x + block.att.out_proj(y)
            x = x + block.ff(block.norm2(x))
            present += [key, value]
        return (model.out_head(model.final_norm(x)), *present)


STACK_TRACE = "pkg.torch.onnx.stack_trace"


def check_opset(opset: int) -> None:
    if opset not in SUPPORTED_OPSETS:
        raise PipelineError(
            f"export.opset={opset} is not supported: use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} "
            f"(the dynamo exporter writes opset ≥ 18; onnxruntime {ort.__version__} runs up to 25)"
        )


def check_parity_tokens(parity_tokens: int, ctx: int) -> None:
    if not 1 <= parity_tokens < ctx:
        raise PipelineError(
            f"export.parity_tokens={parity_tokens} must be in 1..{ctx - 1} (context_length {ctx} "
            "holds a prompt and the generated tokens)"
        )


def check_params(params: ExportParams, model_dir: Path) -> None:
    """What the ONNX and HF exports would refuse in ``export`` params, checked before any format writes a file."""
    check_opset(params.opset)
    shape = read_model_config(model_dir)["model"]
    if not shape.get("n_classes"):
        check_parity_tokens(params.parity_tokens, shape["context_length"])


def export_graph(model: GPT, path: Path, opset: int) -> None:
    """Write ``model`` as one ONNX graph with dynamic batch, sequence and cache-length axes."""
    check_opset(opset)
    cfg = model.cfg
    n_cache = 2 * cfg.n_layer
    # Trace with two filled positions and three new tokens: the general case of the attention op.
    input_ids = torch.zeros(2, 3, dtype=torch.long)
    cache = tuple(torch.zeros(2, cfg.kv_heads, cfg.context_length, cfg.head_dim) for _ in range(n_cache))
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1, max=cfg.context_length)
    cache_len = torch.export.Dim("cache_len", min=2, max=cfg.context_length)
    dynamic_shapes = ({0: batch, 1: seq}, None, tuple({0: batch, 2: cache_len} for _ in range(n_cache)))
    with warnings.catch_warnings(), quiet_logger("torch.onnx"):
        warnings.simplefilter(
            "ignore"
        )  # exporter chatter (axis renames, deprecations) is not the user's problem
        program = torch.onnx.export(
            SharedCacheGPT(model).eval(),
            (input_ids, torch.tensor(2), *cache),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            input_names=[INPUT_IDS, PAST_LENGTH, *past_names(cfg.n_layer)],
            output_names=[LOGITS, *present_names(cfg.n_layer)],
            verbose=False,
        )
    strip_source_paths(program.model)
    program.save(str(path))


def strip_source_paths(model: ir.Model) -> None:
    """Drop the exporter's per-node Python stack traces: they hold absolute paths of this checkout, so two
    checkouts would export different bytes (the module names and scopes it also records are kept)."""
    for graph in (model.graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            node.metadata_props.pop(STACK_TRACE, None)


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 (weights int8 once, activations quantized per call): MatMul and the embedding Gather.

    ``quant_pre_process`` first folds the tied head's Transpose into a constant, so the head's MatMul —
    a third of the weights at the gpt2-124m shape — is quantized too.
    """
    with tempfile.TemporaryDirectory(prefix="quant-", dir=dst.parent) as tmp:
        folded = Path(tmp) / "folded.onnx"
        quant_pre_process(str(src), str(folded), skip_symbolic_shape=True)
        quantize_dynamic(
            str(folded), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"]
        )


def real_windows(shards: Path, fingerprint: str, context_length: int) -> np.ndarray:
    """Up to ``REAL_WINDOWS`` validation windows (N, context_length): the real prompts of the checks."""
    dataset = ShardDataset(shards, "val", expected_fingerprint=fingerprint)
    x, _ = next(dataset.sequential(REAL_WINDOWS, context_length, max_batches=1))
    return x.numpy()


def _rows(windows: np.ndarray, batch: int, length: int) -> np.ndarray:
    return np.ascontiguousarray(windows[np.arange(batch) % len(windows), :length])


@dataclass
class ForwardParity:
    """The largest differences seen so far between onnxruntime's and torch's outputs."""

    max_abs_logit_diff: float = 0.0
    max_abs_cache_diff: float = 0.0
    calls: int = 0

    def add(self, logits: np.ndarray, reference: torch.Tensor, cache: OnnxCache, ref_cache: KVCache) -> None:
        self.max_abs_logit_diff = max(
            self.max_abs_logit_diff, float(np.abs(logits - reference.numpy()).max())
        )
        flat_ref = [t for kv in ref_cache for t in kv]
        self.max_abs_cache_diff = max(
            self.max_abs_cache_diff,
            max(float(np.abs(c - r.numpy()).max()) for c, r in zip(cache.arrays(), flat_ref, strict=False)),
        )
        self.calls += 1


@torch.inference_mode()
def forward_parity(
    model: GPT, onnx: OnnxGenerator, prompts: list[np.ndarray], rng: np.random.Generator
) -> ForwardParity:
    """Prefill each (B, T) prompt through torch and onnxruntime, then decode one token and a 3-token chunk
    on each side's own cache, while the context has room; the largest logit and cache differences."""
    parity = ForwardParity()
    for ids in prompts:
        logits, cache = onnx.forward(ids)
        ref_logits, ref_cache = model(torch.from_numpy(ids))
        parity.add(logits, ref_logits, cache, ref_cache)
        used = ids.shape[1]
        for width in (1, 3):
            if used + width > model.cfg.context_length:
                break
            step = rng.integers(0, model.cfg.vocab_size, (ids.shape[0], width))
            logits, cache = onnx.forward(step, cache)
            ref_logits, ref_cache = model(torch.from_numpy(step), past=ref_cache)
            parity.add(logits, ref_logits, cache, ref_cache)
            used += width
    return parity


def greedy_parity(model: GPT, onnx: OnnxGenerator, prompts: list[list[int]], tokens: int) -> int:
    """Tokens that onnxruntime's greedy decoding shares with torch's before the first difference (worst prompt)."""
    opts = SamplingOptions(max_new_tokens=tokens, temperature=0.0)
    matched = tokens
    for prompt in prompts:
        ours = onnx.generate(prompt, opts)
        theirs = [int(t) for t in stream_tokens(model, torch.tensor([prompt]), opts)]
        same = 0
        while same < min(len(ours), len(theirs)) and ours[same] == theirs[same]:
            same += 1
        matched = min(matched, same)
    return matched


def top1_agreement(fp32: OnnxGenerator, int8: OnnxGenerator, windows: np.ndarray) -> tuple[float, int, float]:
    """Share of positions where int8's most likely next token is fp32's; positions; max abs logit difference."""
    agree, positions, diff = 0, 0, 0.0
    for row in windows:
        a, _ = fp32.forward(row[None, :])
        b, _ = int8.forward(row[None, :])
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += a.shape[1]
        diff = max(diff, float(np.abs(a - b).max()))
    return agree / positions, positions, diff


def check_parity(
    model: GPT, onnx: OnnxGenerator, windows: np.ndarray, params: ExportParams, seed: int
) -> dict:
    """Random and real prompts of several lengths and batch sizes; raises PipelineError past ``parity_atol``."""
    ctx = model.cfg.context_length
    rng = np.random.default_rng(seed)
    shapes = sorted({(1, 1), (2, 7), (4, max(1, ctx // 2)), (1, ctx)})
    random_prompts = [rng.integers(0, model.cfg.vocab_size, shape) for shape in shapes]
    real_prompts = [_rows(windows, batch, min(length, ctx)) for batch, length in shapes]
    random = forward_parity(model, onnx, random_prompts, rng)
    real = forward_parity(model, onnx, real_prompts, rng)
    worst = max(random.max_abs_logit_diff, real.max_abs_logit_diff)
    if worst > params.parity_atol:
        raise PipelineError(
            f"export parity failed: max |logit(onnxruntime) - logit(torch)| = {worst:.3g} > "
            f"export.parity_atol={params.parity_atol:g}; nothing was exported"
        )
    prompt_length = min(32, ctx - params.parity_tokens)
    greedy_prompts = [row[:prompt_length].tolist() for row in _rows(windows, 2, prompt_length)]
    matched = greedy_parity(model, onnx, greedy_prompts, params.parity_tokens)
    if matched < params.parity_tokens:
        raise PipelineError(
            f"export parity failed: onnxruntime greedy decoding left torch's after {matched} of "
            f"export.parity_tokens={params.parity_tokens} tokens; nothing was exported"
        )
    return {
        "max_abs_logit_diff": worst,
        "max_abs_logit_diff_random": random.max_abs_logit_diff,
        "max_abs_logit_diff_real": real.max_abs_logit_diff,
        "max_abs_cache_diff": max(random.max_abs_cache_diff, real.max_abs_cache_diff),
        "calls": random.calls + real.calls,
        "atol": params.parity_atol,
        "greedy_tokens_matched": matched,
        "greedy_prompts": len(greedy_prompts),
        "passed": True,
    }


def check_int8(fp32: OnnxGenerator, int8: OnnxGenerator, windows: np.ndarray, params: ExportParams) -> dict:
    agreement, positions, diff = top1_agreement(fp32, int8, windows)
    if agreement < params.int8_min_agreement:
        raise PipelineError(
            f"int8 export failed: top-1 next-token agreement with fp32 {agreement:.1%} < "
            f"export.int8_min_agreement={params.int8_min_agreement:.0%} over {positions} real positions; "
            "nothing was exported (set export.quantize_int8: false to export fp32 only)"
        )
    return {"top1_agreement": agreement, "positions": positions, "max_abs_logit_diff": diff, "passed": True}


def _size_mb(path: Path) -> float:
    return round(path.stat().st_size / 1e6, 3)


def onnx_readme(config: dict, metrics: dict) -> str:
    model, onnx = config["model"], config["onnx"]
    parity, int8 = metrics["parity"], metrics.get("int8")
    sizes = metrics["size_mb"]
    kv_heads = (
        model.get("n_kv_head") or model["n_head"]
    )  # the cache's heads (GQA: fewer than the query heads)
    head_dim = model.get("head_size") or model["n_embd"] // model["n_head"]
    files = "\n".join(
        f"| `{name}` | {variant} | {sizes[variant]} MB |" for variant, name in onnx["files"].items()
    )
    int8_line = (
        f"- int8 (dynamic quantization, int8 weights): top-1 next-token agreement with fp32 "
        f"{int8['top1_agreement']:.2%} over {int8['positions']} real positions.\n"
        if int8
        else ""
    )
    return f"""# {config["source"]["directory"]} as ONNX

GPT ({model["n_layer"]} layers, {model["n_head"]} heads, {model["n_embd"]} wide, vocabulary {model["vocab_size"]},
context {model["context_length"]} tokens, {"tied" if model["tie_weights"] else "untied"} embedding/head),
exported by the llm-pipeline `export` stage with {onnx["exporter"]}, opset {onnx["opset"]}.

| file | variant | size |
|---|---|---|
{files}

Also here: `tokenizer/` (tiktoken rank file + metadata, fingerprint `{config["tokenizer"]["fingerprint"][:12]}…`)
and `config.json` (model shape, graph inputs/outputs, provenance).

## Graph

One graph serves prefill and decode. Inputs: `input_ids` int64 (batch, seq), `past_length` int64 scalar (the
positions of the cache already filled; 0 for the prompt) and, per layer i, `past_key_values.i.key` /
`past_key_values.i.value` float32 (batch, {kv_heads}, cache_len, {head_dim}):
fixed-size buffers, cache_len up to {model["context_length"]}. Outputs: `logits` float32 (batch, seq,
{model["vocab_size"]}) for every position and `present.i.key` / `present.i.value`, the buffers with the new
positions written. Bind each present output to its past input (onnxruntime IO binding) and the step writes in
place. Attention is onnxruntime's `GroupQueryAttention` (com.microsoft), so the graph needs onnxruntime. Rows of
a batch share one length (no padding mask); after the prompt, several new tokens at once need batch 1.

## Checked at export

- fp32 vs torch over {parity["calls"]} prefill/decode calls on random and real prompts (several lengths, batch
  sizes 1–4): max |logit difference| {parity["max_abs_logit_diff"]:.2e} (limit {parity["atol"]:g}).
- Greedy decoding through onnxruntime equals torch's for {parity["greedy_tokens_matched"]} tokens on
  {parity["greedy_prompts"]} real prompts.
{int8_line}
## Use (needs onnxruntime, tiktoken, numpy — no torch)

```python
from pipeline.export.onnx_generate import OnnxGenerator
from pipeline.model.sampling import SamplingOptions

gen = OnnxGenerator("models/onnx", variant="int8")   # or "fp32"
ids = gen.tokenizer.encode("En un lugar de la Mancha")
for token in gen.stream(ids, SamplingOptions(max_new_tokens=50, temperature=0.8, top_k=40, seed=1)):
    print(gen.tokenizer.decode([token]), end="", flush=True)
```
"""


def onnx_config(model: GPT, opset: int, variants: dict[str, str], **extra: object) -> dict:
    """``config.json`` of an ONNX directory: the model shape, the graph's names, the variant files."""
    return {
        "model": model.cfg.to_dict(),
        "onnx": {
            "exporter": EXPORTER,
            "opset": opset,
            "files": variants,
            "inputs": [INPUT_IDS, PAST_LENGTH, *past_names(model.cfg.n_layer)],
            "outputs": [LOGITS, *present_names(model.cfg.n_layer)],
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
        **extra,
    }


def write_variants(model: GPT, directory: Path, opset: int, int8: bool) -> dict[str, str]:
    """The fp32 graph and, when ``int8``, its quantized twin in ``directory``; variant → file name."""
    variants = {"fp32": VARIANT_FILES["fp32"]}
    export_graph(model, directory / variants["fp32"], opset)
    if int8:
        variants["int8"] = VARIANT_FILES["int8"]
        quantize_int8(directory / variants["fp32"], directory / variants["int8"])
    return variants


def export_model(
    model_dir: Path,
    tokenizer_dir: Path,
    shards_dir: Path,
    out_dir: Path,
    params: ExportParams,
    seed: int,
    **metadata: object,
) -> dict:
    """Export ``model_dir`` into ``out_dir`` (replaced atomically, only when every check passes); the metrics."""
    check_opset(params.opset)
    loaded = load_with_tokenizer(model_dir, tokenizer_dir)
    model = loaded.model.eval()
    ctx = model.cfg.context_length
    if model.cfg.n_classes:
        texts = [
            row[: 2 + 13 * i % max(1, ctx - 2)].tolist()
            for i, row in enumerate(real_windows(shards_dir, loaded.tokenizer_fingerprint, ctx))
        ]
        return export_classifier(model, loaded.meta, tokenizer_dir, out_dir, texts, params, seed, **metadata)
    check_parity_tokens(params.parity_tokens, ctx)
    windows = real_windows(shards_dir, loaded.tokenizer_fingerprint, ctx)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
        int8 = " + int8" if params.quantize_int8 else ""
        print(f"export: {model_dir} → ONNX opset {params.opset} ({EXPORTER}){int8}")
        variants = write_variants(model, tmp, params.opset, params.quantize_int8)
        config = onnx_config(
            model,
            params.opset,
            variants,
            sha256={name: sha256_file(tmp / name) for name in variants.values()},
            source={"directory": str(model_dir), "stage": loaded.meta.get("stage")},
            tokenizer={
                "path": TOKENIZER_DIR,
                "fingerprint": loaded.tokenizer_fingerprint,
                "eot_token": loaded.enc.eot_token,
            },
            **metadata,
        )
        write_json(tmp / CONFIG, config)
        print("export: parity checks (torch vs onnxruntime)")
        fp32 = OnnxGenerator(tmp, "fp32")
        metrics = {"parity": check_parity(model, fp32, windows, params, seed)}
        if params.quantize_int8:
            metrics["int8"] = check_int8(fp32, OnnxGenerator(tmp, "int8"), windows, params)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        metrics["size_mb"] = {variant: _size_mb(tmp / name) for variant, name in variants.items()}
        metrics["size_mb"]["torch_weights"] = round(weight_bytes / 1e6, 3)
        metrics["fp32_size_vs_weights"] = round(
            metrics["size_mb"]["fp32"] / metrics["size_mb"]["torch_weights"], 4
        )
        (tmp / MODEL_CARD).write_text(onnx_readme(config, metrics), encoding="utf-8")
    return metrics
