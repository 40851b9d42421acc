"""The dtype rule: measured on this machine at the model's shapes, cached so noise cannot flip it, fp32 on ties."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.model import runtime
from pipeline.model.gpt import config_from_preset


@pytest.mark.parametrize(
    ("fp32", "bf16", "expected"),
    [
        (152.0, 83.0, torch.float32),  # avx512_bf16 without AMX: bf16 is slower
        (200.0, 650.0, torch.bfloat16),  # AMX: bf16 several times faster
        (100.0, 105.0, torch.float32),  # within noise: fp32
    ],
)
def test_pick_dtype_takes_the_clearly_faster_one(fp32, bf16, expected):
    assert runtime.pick_dtype(fp32, bf16) == expected


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ({torch.float32: 150.0, torch.bfloat16: 80.0}, "fp32"),
        ({torch.float32: 150.0, torch.bfloat16: 450.0}, "bf16"),
    ],
)
def test_auto_measures_once_then_reuses_the_rates(tmp_path, monkeypatch, rates, expected):
    timed = []
    monkeypatch.setattr(
        runtime,
        "_measure",
        lambda shapes: timed.append(shapes) or (rates[torch.float32], rates[torch.bfloat16]),
    )
    shapes = runtime.matmul_shapes(config_from_preset("cpu-tiny", vocab_size=512), tokens=256)
    cache = tmp_path / "dtype-rates.json"
    first = runtime.measured_cpu_dtype(shapes, cache)
    assert runtime.DTYPE_NAMES[first.dtype] == expected and first.source == "measured"
    assert first.as_metrics() == {
        "chosen": expected,
        "source": "measured",
        "fp32_gflops": rates[torch.float32],
        "bf16_gflops": rates[torch.bfloat16],
    }
    monkeypatch.setattr(runtime, "_measure", lambda shapes: pytest.fail("measured twice"))
    second = runtime.measured_cpu_dtype(shapes, cache)
    assert (second.dtype, second.source, second.fp32_gflops) == (first.dtype, "cached", first.fp32_gflops)
    assert len(timed) == 1 and len(json.loads(cache.read_text())) == 1


def test_forced_dtypes_are_not_measured(monkeypatch):
    monkeypatch.setattr(runtime, "_measure", lambda shapes: pytest.fail("a forced dtype was measured"))
    cpu = torch.device("cpu")
    assert runtime.choose_dtype("fp32", cpu).as_metrics() == {"chosen": "fp32", "source": "forced"}
    assert runtime.choose_dtype("bf16", cpu).dtype == torch.bfloat16


def test_a_real_measurement_gives_positive_rates(tmp_path):
    choice = runtime.measured_cpu_dtype([(64, 64, 64)], tmp_path / "rates.json")
    assert choice.fp32_gflops > 0 and choice.bf16_gflops > 0
    assert choice.dtype == runtime.pick_dtype(choice.fp32_gflops, choice.bf16_gflops)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_the_timed_shapes_are_every_product_of_a_training_step(mlp):
    cfg = config_from_preset("cpu-tiny", vocab_size=512, mlp=mlp)
    d, h, tokens = cfg.n_embd, cfg.mlp_hidden, 256
    shapes = runtime.matmul_shapes(cfg, tokens)
    for k, n in ((d, 3 * d), (d, h), (h, d), (d, 512)):
        assert {(tokens, k, n), (tokens, n, k), (k, tokens, n)} <= set(
            shapes
        )  # forward, input grad, weight grad
    assert len(shapes) == 3 * (6 if mlp == "swiglu" else 5)
