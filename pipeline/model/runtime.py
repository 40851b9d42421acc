"""Where and how a stage computes: the device, the dtype, autocast, and which worker this process is.

Training, evaluation, the DPO reference pass, the server's torch path and the benchmarks all ask here, so a rule
("auto means bf16 only where this machine multiplies the model's shapes clearly faster in it") is decided once.
Some CPUs (AMX) run bf16 matmuls faster than fp32, others (avx512_bf16 only) slower: the flags cannot tell, so
the choice is measured (BENCHMARKS.md has the figures).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.common.atomic import write_json
from pipeline.common.config import resolve_cache_dir
from pipeline.common.errors import PipelineError
from pipeline.model.gpt import GPTConfig


def rank() -> int:
    """This worker's global rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True in the one process that writes a stage's outputs."""
    return rank() == 0


def local_device(requested: str) -> torch.device:
    """``auto`` → this worker's GPU when there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"device '{requested}' requested but no CUDA device is available")
        if device.index is None:
            device = torch.device(
                "cuda", int(os.environ.get("LOCAL_RANK", 0))
            )  # torchrun: one GPU per local worker
        torch.cuda.set_device(device)  # so a bare "cuda" (and NCCL) means this worker's GPU
    return device


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a stage computes in, and why: ``forced`` by params, ``measured`` now, or ``cached`` from an
    earlier measurement on this machine (CPU model + torch version + shapes)."""

    dtype: torch.dtype
    source: str
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None

    def as_metrics(self) -> dict[str, float | str]:
        rates = {
            f"{name}_gflops": round(rate, 1)
            for name, rate in (("fp32", self.fp32_gflops), ("bf16", self.bf16_gflops))
            if rate is not None
        }
        return {"chosen": DTYPE_NAMES[self.dtype], "source": self.source, **rates}


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
BF16_MARGIN = 1.10  # bf16 must be this much faster: within noise, fp32 wins (exact resume is simpler in it)


def pick_dtype(fp32_gflops: float, bf16_gflops: float) -> torch.dtype:
    """The faster dtype by measured rate; fp32 unless bf16 is clearly (BF16_MARGIN) faster."""
    return torch.bfloat16 if bf16_gflops > BF16_MARGIN * fp32_gflops else torch.float32


def matmul_shapes(cfg: GPTConfig, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of what a training step multiplies for ``tokens`` positions, per block and the head: each
    forward product and its two backward ones."""
    d, hidden, attn = cfg.n_embd, cfg.mlp_hidden, cfg.n_head * cfg.head_dim
    weights = [
        (d, attn + 2 * cfg.kv_heads * cfg.head_dim),
        (attn, d),
        (d, hidden),
        (hidden, d),
        (d, cfg.vocab_size),
    ]  # qkv, out_proj, fc, proj, head
    if cfg.mlp == "swiglu":
        weights.append((d, hidden))  # SwiGLU's gate
    # The forward, the input's gradient, and the weight's, whose inner dimension is the tokens: the backward ones run
    # faster than the forward's, so a rate timed on the forward alone is no peak and an MFU against it can pass 100%.
    return [shape for k, n in weights for shape in ((tokens, k, n), (tokens, n, k), (k, tokens, n))]


def _measure(
    shapes: list[tuple[int, int, int]], repeats: int = 5, min_seconds: float = 0.05
) -> tuple[float, float]:
    """(fp32, bf16) GFLOP/s of ``shapes`` on the CPU: the best of ``repeats`` timed blocks of at least
    ``min_seconds`` each."""
    flops = sum(2 * m * k * n for m, k, n in shapes)  # a multiply and an add per term
    operands = {
        dtype: [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in shapes]
        for dtype in (torch.float32, torch.bfloat16)
    }

    def block(dtype: torch.dtype, inner: int) -> float:
        start = time.perf_counter()
        for _ in range(inner):
            for a, b in operands[dtype]:
                a @ b  # the result is dropped: only the time counts
        return (time.perf_counter() - start) / inner

    inner = {
        dtype: max(1, int(min_seconds / max(block(dtype, 1), 1e-6))) for dtype in operands
    }  # also warms up
    best = {dtype: float("inf") for dtype in operands}
    for _ in range(repeats):
        for dtype in operands:  # the dtypes alternate, so a neighbour's load hits both alike
            best[dtype] = min(best[dtype], block(dtype, inner[dtype]))
    return flops / best[torch.float32] / 1e9, flops / best[torch.bfloat16] / 1e9


def _cache_key(shapes: list[tuple[int, int, int]]) -> str:
    return f"{platform.processor() or platform.machine()}|{_cpu_model()}|torch {torch.__version__}|{shapes}"


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown cpu"


def measured_cpu_dtype(shapes: list[tuple[int, int, int]], cache_file: Path | None = None) -> DtypeChoice:
    """fp32 or bf16 by timing ``shapes`` in both, once per machine (the rates are stored in ``cache_file``)."""
    cache_file = cache_file or resolve_cache_dir() / "dtype-rates.json"
    key = _cache_key(shapes)  # CPU model + torch version + shapes
    try:
        stored = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.is_file() else {}
    except (OSError, json.JSONDecodeError):
        stored = {}
    # Stored rates are reused, so timing noise can never flip the choice between two runs of the same params
    # (DVC would see other outputs).
    if key in stored:
        fp32, bf16 = stored[key]["fp32"], stored[key]["bf16"]
        return DtypeChoice(pick_dtype(fp32, bf16), "cached", fp32, bf16)
    fp32, bf16 = _measure(shapes)
    write_json(cache_file, {**stored, key: {"fp32": fp32, "bf16": bf16}})
    return DtypeChoice(pick_dtype(fp32, bf16), "measured", fp32, bf16)


def choose_dtype(
    requested: str, device: torch.device, cfg: GPTConfig | None = None, tokens: int = 4096
) -> DtypeChoice:
    """``fp32``/``bf16`` as asked; ``auto``: bf16 on CUDA devices that have it, and on a CPU whichever dtype
    multiplies the model's own matmul shapes faster here (a 2048² square when no model is given)."""
    if requested == "fp32":
        return DtypeChoice(torch.float32, "forced")
    if device.type == "cuda":  # no timing on a GPU: bf16 wherever the device has it
        supported = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not supported:
            raise PipelineError(
                f"params: dtype 'bf16' requested but {torch.cuda.get_device_name(device)} lacks bf16"
            )
        return DtypeChoice(
            torch.bfloat16 if supported else torch.float32, "forced" if requested == "bf16" else "device"
        )
    if requested == "bf16":
        return DtypeChoice(torch.bfloat16, "forced")
    shapes = matmul_shapes(cfg, tokens) if cfg is not None else [(2048, 2048, 2048)]
    return measured_cpu_dtype(shapes)


def resolve_dtype(
    requested: str, device: torch.device, cfg: GPTConfig | None = None, tokens: int = 4096
) -> torch.dtype:
    """The dtype of :func:`choose_dtype`, for callers that need only the dtype."""
    return choose_dtype(requested, device, cfg, tokens).dtype


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision in ``dtype`` (a no-op for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
