"""The grow-by-concat KV-cache graph, the design the export stage replaced, kept to measure what it costs.

Each layer's past keys/values come in as arrays of the length used so far and leave one position longer: the
graph's Concat copies the whole cache every step. ``bench.export`` decodes through it beside the exported
graph (fixed-size buffers written in place by GroupQueryAttention).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pipeline.export.onnx import quiet_logger
from pipeline.export.onnx_generate import INPUT_IDS, LOGITS, past_names, present_names, session_options
from pipeline.model.gpt import GPT


class ConcatCacheGPT(torch.nn.Module):
    """The GPT with its growing KV cache as flat tensors (ONNX inputs/outputs are tensors, not pairs)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *past_flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past = list(zip(past_flat[0::2], past_flat[1::2], strict=False))
        logits, present = self.model(input_ids, past=past)
        return (logits, *(t for kv in present for t in kv))


def export_concat_graph(model: GPT, path: Path, opset: int, dynamo: bool = True) -> None:
    """The grow-by-concat graph, by the dynamo exporter or (``dynamo=False``) the legacy TorchScript one."""
    cfg = model.cfg
    names_in, names_out = [INPUT_IDS, *past_names(cfg.n_layer)], [LOGITS, *present_names(cfg.n_layer)]
    # Trace with a past and more than one new token: the general attention path (a mask over past + new).
    args = (
        torch.zeros(2, 3, dtype=torch.long),
        *(torch.zeros(2, cfg.n_head, 2, cfg.head_dim) for _ in names_in[1:]),
    )
    with warnings.catch_warnings(), quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")  # exporter chatter and TracerWarnings about Python-side length checks
        if dynamo:
            batch, seq = (
                torch.export.Dim("batch", min=1),
                torch.export.Dim("seq", min=1, max=cfg.context_length),
            )
            past_seq = torch.export.Dim("past_seq", min=0, max=cfg.context_length)
            shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: past_seq} for _ in names_in[1:]))
            program = torch.onnx.export(
                ConcatCacheGPT(model).eval(),
                args,
                dynamo=True,
                dynamic_shapes=shapes,
                opset_version=opset,
                input_names=names_in,
                output_names=names_out,
                verbose=False,
            )
            program.save(str(path))
            return
        axes = {INPUT_IDS: {0: "batch", 1: "seq"}, LOGITS: {0: "batch", 1: "seq"}}
        axes |= {n: {0: "batch", 2: "past_seq"} for n in names_in[1:]}
        axes |= {n: {0: "batch", 2: "total"} for n in names_out[1:]}
        torch.onnx.export(
            ConcatCacheGPT(model).eval(),
            args,
            str(path),
            dynamo=False,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=axes,
            opset_version=opset,
        )


def concat_session(path: Path, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def concat_greedy_stream(session: ort.InferenceSession, model: GPT, prompt: list[int]) -> Iterator[int]:
    """Greedy decoding through a grow-by-concat graph, the cache handed back and forth as numpy arrays."""
    cfg = model.cfg
    names, outputs = past_names(cfg.n_layer), [LOGITS, *present_names(cfg.n_layer)]
    past = [np.zeros((1, cfg.n_head, 0, cfg.head_dim), np.float32) for _ in names]
    ids = np.array([prompt], dtype=np.int64)
    while True:
        logits, *past = session.run(outputs, {INPUT_IDS: ids, **dict(zip(names, past, strict=False))})
        ids = logits[:, -1].argmax(-1)[:, None]
        yield int(ids[0, 0])
