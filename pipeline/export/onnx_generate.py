"""Generation through the exported ONNX model with onnxruntime and numpy only: deployment needs no torch.

``models/onnx/`` (written by ``pipeline.export.onnx``) holds ``model.onnx`` (fp32), ``model.int8.onnx`` (dynamic int8),
``config.json`` and ``tokenizer/``. One graph serves prefill and decode: ``input_ids`` (batch, seq), ``past_length``
(int64 scalar: tokens already in the cache) and one ``past_key_values.{i}.key`` / ``.value`` pair per layer in;
``logits`` (batch, seq, vocab) and ``present.{i}.key`` / ``.value`` out. The cache tensors are fixed-size
buffers (batch, heads, cache_len, head_dim) that onnxruntime's GroupQueryAttention writes the new keys and
values into; ``OnnxCache`` binds each present output to its past input (IO binding), so a step writes one
position in place instead of copying the whole cache.

Sampling follows ``pipeline.model.generate`` rule for rule (repeat penalty, temperature, top-k, top-p nucleus, EOS,
seed), in numpy;
greedy decoding equals torch's token for token (the export stage checks it), sampled text is reproducible per
seed but is not torch's random stream.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tiktoken

from pipeline.common.errors import PipelineError
from pipeline.common.hashing import sha256_file
from pipeline.common.json_files import read_json
from pipeline.data.tokenizer import load_tokenizer
from pipeline.model.sampling import SamplingOptions

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
INPUT_IDS, PAST_LENGTH, LOGITS = "input_ids", "past_length", "logits"


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def filter_logits(logits: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """``pipeline.model.generate.filter_logits`` in numpy: -inf outside the top-k and outside the top-p nucleus."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = -np.partition(-logits, top_k - 1, axis=-1)[..., top_k - 1 : top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        probs = softmax(np.take_along_axis(logits, order, axis=-1))
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (np.cumsum(probs, axis=-1) - probs) >= top_p
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits = np.where(drop, -np.inf, logits)
    return logits


def penalize_repeats(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """``pipeline.model.generate.penalize_repeats`` for one row (1, V): each id in ``history`` penalised once."""
    seen = np.zeros(logits.shape[-1], dtype=bool)
    seen[list(history)] = True
    return np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sample_next(logits: np.ndarray, opts: SamplingOptions, rng: np.random.Generator) -> np.ndarray:
    """Next token ids (B,) from last-position logits (B, V); argmax when ``temperature == 0``."""
    if opts.temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits.astype(np.float64)
    logits = (
        logits - logits.max(axis=-1, keepdims=True)
    ) / opts.temperature  # finite for any temperature > 0
    probs = softmax(filter_logits(logits, opts.top_k, opts.top_p))
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random(len(probs)) * cumulative[:, -1]
    return np.array(
        [np.searchsorted(row, u, side="right") for row, u in zip(cumulative, draws, strict=False)]
    )


def read_onnx_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    config = read_json(path, "ONNX export config", "run `dvc repro export`")
    if (
        not isinstance(config.get("model"), dict)
        or not isinstance(config.get("onnx"), dict)
        or "files" not in config["onnx"]
    ):
        raise PipelineError(f"{path}: not an ONNX export config (needs 'model' and 'onnx.files')")
    return config


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Full graph optimisation (fusions, constant folding of the tied head's transpose); ``threads`` intra-op."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    return options


def verify_file(path: Path, config: dict, config_path: Path) -> None:
    """Check a model file against the sha256 its directory's config.json records (as model directories do)."""
    recorded = config.get("sha256")
    expected = recorded.get(path.name) if isinstance(recorded, dict) else None
    if not isinstance(expected, str):
        raise PipelineError(
            f"{config_path}: no sha256 recorded for {path.name} (re-run the export: dvc repro export)"
        )
    if sha256_file(path) != expected:
        raise PipelineError(
            f"{path}: contents do not match the sha256 recorded in {config_path.name} "
            "(corrupted or replaced; restore it with `dvc checkout export` or re-run the export)"
        )


class OnnxCache:
    """The KV cache of one generation: a fixed-size onnxruntime buffer per layer's keys and values, and how many
    positions of them are filled. The graph's present outputs are bound to these same buffers."""

    def __init__(self, batch: int, n_layer: int, n_head: int, capacity: int, head_dim: int):
        shape = (batch, n_head, capacity, head_dim)
        self.buffers = [
            ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for _ in range(2 * n_layer)
        ]
        self.batch, self.capacity, self.length = batch, capacity, 0

    def arrays(self) -> list[np.ndarray]:
        """Copies of the filled part of every buffer, in ``past_names`` order (for inspection and checks)."""
        return [np.array(buffer.numpy()[:, :, : self.length]) for buffer in self.buffers]


class OnnxGenerator:
    """The exported model in an onnxruntime session, decoding into preallocated KV buffers (``OnnxCache``).

    With the buffers shared between past and present, a decode step no longer copies the cache (the Concat of a
    grow-by-concat graph; what that cost is in BENCHMARKS.md).
    """

    def __init__(self, directory: str | Path, variant: str = "fp32", threads: int | None = None):
        directory = Path(directory)
        self.config = read_onnx_config(directory)
        files = self.config["onnx"]["files"]
        if variant not in files:
            raise PipelineError(f"{directory / CONFIG_FILE}: no '{variant}' model (has {', '.join(files)})")
        self.path = directory / files[variant]
        if not self.path.is_file():
            raise PipelineError(f"{self.path}: ONNX model file missing")
        verify_file(self.path, self.config, directory / CONFIG_FILE)
        model = self.config["model"]
        self.n_layer = model["n_layer"]
        self.kv_heads = model.get("n_kv_head") or model["n_head"]  # the cache's heads: key/value heads (GQA)
        self.head_dim = model.get("head_size") or model["n_embd"] // model["n_head"]
        self.context_length, self.vocab_size = model["context_length"], model["vocab_size"]
        self.variant, self.directory = variant, directory
        try:
            self.session = ort.InferenceSession(
                str(self.path), session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise PipelineError(f"{self.path}: onnxruntime cannot load it ({exc})") from None
        self._past_names = past_names(self.n_layer)
        self._present_names = present_names(self.n_layer)

    @functools.cached_property
    def tokenizer(self) -> tiktoken.Encoding:
        """The tokenizer saved beside the model (loaded on first use: the graph itself needs none)."""
        return load_tokenizer(self.directory / TOKENIZER_DIR)

    def new_cache(self, batch: int) -> OnnxCache:
        """Empty KV buffers for ``batch`` rows and the whole context."""
        return OnnxCache(batch, self.n_layer, self.kv_heads, self.context_length, self.head_dim)

    def forward(self, input_ids: np.ndarray, cache: OnnxCache | None = None) -> tuple[np.ndarray, OnnxCache]:
        """Logits (B, T, V) for ``input_ids`` (B, T) after what ``cache`` holds; the cache, updated in place.

        onnxruntime's GroupQueryAttention takes several new tokens after a filled cache only for batch 1, so a
        batch of such chunks goes through one position at a time (same logits, T runs instead of one).
        """
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        batch, length = input_ids.shape
        cache = self.new_cache(batch) if cache is None else cache
        if cache.batch != batch:
            raise ValueError(f"input_ids has {batch} rows but the cache was made for {cache.batch}")
        if cache.length + length > cache.capacity:
            raise ValueError(
                f"sequence of {cache.length + length} tokens exceeds the cache's {cache.capacity} positions"
            )
        if batch > 1 and length > 1 and cache.length > 0:
            steps = [self.forward(input_ids[:, i : i + 1], cache)[0] for i in range(length)]
            return np.concatenate(steps, axis=1), cache
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, input_ids)
        binding.bind_cpu_input(PAST_LENGTH, np.array(cache.length, dtype=np.int64))
        binding.bind_output(LOGITS)
        for past, present, buffer in zip(self._past_names, self._present_names, cache.buffers, strict=False):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        self.session.run_with_iobinding(binding)
        cache.length += length
        return binding.get_outputs()[0].numpy(), cache

    def stream(self, prompt_ids: list[int], opts: SamplingOptions) -> Iterator[int]:
        """Yield generated token ids one at a time (EOS included when produced), as ``stream_tokens`` does.

        Stops after ``max_new_tokens``, at ``eos_id``, or when the context is full.
        """
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: the model needs at least one token to continue")
        ids = np.asarray([prompt_ids], dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(
                f"prompt_ids must be in [0, {self.vocab_size}), got {int(ids.min())}..{int(ids.max())}"
            )
        limit = min(opts.max_new_tokens, self.context_length - ids.shape[1])
        if limit <= 0:
            return
        rng = np.random.default_rng(opts.seed)
        window = opts.repeat_window(self.context_length)
        history = list(prompt_ids)
        logits, cache = self.forward(ids)
        for step in range(limit):
            last = logits[:, -1, :]
            if opts.penalizes:
                last = penalize_repeats(last, history[-window:], opts.repeat_penalty)
            token = int(sample_next(last, opts, rng)[0])
            history.append(token)
            yield token
            if token == opts.eos_id or step == limit - 1:
                return
            logits, cache = self.forward(np.array([[token]]), cache)

    def generate(self, prompt_ids: list[int], opts: SamplingOptions) -> list[int]:
        """The generated ids only (not the prompt): ``list(stream(...))``."""
        return list(self.stream(prompt_ids, opts))
