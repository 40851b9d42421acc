"""Where and how a stage computes: the device, the dtype, autocast, and which worker this process is.

Training, evaluation, the DPO reference pass and the stages all ask here, so a rule (e.g. "auto means bf16 where
this machine multiplies it faster") is decided once and every consumer follows it.
"""
from __future__ import annotations

import contextlib
import os

import torch

from pipeline import perf
from pipeline.errors import PipelineError


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
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 where the device multiplies it faster than fp32 (CUDA with bf16, CPUs with bf16 units)."""
    if requested == "fp32":
        return torch.float32
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not supported:
            raise PipelineError(f"params: dtype 'bf16' requested but {torch.cuda.get_device_name(device)} lacks bf16")
        return torch.bfloat16 if supported else torch.float32
    if requested == "bf16" or perf.cpu_has_bf16_matmul():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision in ``dtype`` (a no-op for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
