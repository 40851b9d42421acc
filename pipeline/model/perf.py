"""What the hardware can do: the measured matmul rate, and MFU against it.

MFU is only honest against the rate of the dtype actually used, measured on this machine (a shared
2-core CPU drifts ±20%; nominal datasheet peaks do not apply), so the loop and the benchmark measure it.
"""

from __future__ import annotations

import functools
import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def matmul_flops(device_type: str, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul in ``dtype`` on this device: the best of ``repeats``.

    The best, not the median: it is a peak, and on a shared machine a slow repeat measures the neighbours.
    """
    device = torch.device(device_type)
    size = size or (8192 if device.type == "cuda" else 2048)  # 1024 under-reads bf16 on CPU
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 2
    a @ b  # warm-up: kernels, allocator
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        synchronize(device)
        times.append((time.perf_counter() - start) / inner)
    return 2 * size**3 / min(times)


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the matmul rate of the dtype."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops > 0 else 0.0
