"""ONNX export of a classifier (``export.model: classifier``): class logits per text, with a parity gate.

A classifier reads one position per text, so its graph needs no KV cache: ``input_ids`` (batch, seq), right-padded,
and ``lengths`` (batch,) in; ``logits`` (batch, n_classes) at each row's last real token out. As for the language
model, the files are built in a temp directory and renamed into place only when onnxruntime's logits match
torch's within ``export.parity_atol`` and pick the same class, on random and real texts of several lengths.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pipeline.common.atomic import atomic_path, write_json
from pipeline.common.config import ExportParams
from pipeline.common.errors import PipelineError
from pipeline.model.checkpoint import CONFIG
from pipeline.model.gpt import GPT, last_token_logits

FILE = "classifier.onnx"
INPUTS = ("input_ids", "lengths")
OUTPUT = "logits"


class ClassifierGraph(torch.nn.Module):
    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return last_token_logits(self.model, input_ids, lengths)


def export_graph(model: GPT, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=2, max=model.cfg.context_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter is not the user's problem
        program = torch.onnx.export(
            ClassifierGraph(model).eval(),
            (torch.ones(2, 5, dtype=torch.long), torch.tensor([5, 3])),
            dynamo=True,
            dynamic_shapes=({0: batch, 1: seq}, {0: batch}),
            opset_version=opset,
            input_names=list(INPUTS),
            output_names=[OUTPUT],
            verbose=False,
        )
    program.save(str(path))


def _batches(model: GPT, texts: list[list[int]], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Right-padded batches: the real texts together, then random ids of mixed lengths (batch 1 and 4)."""
    rng = np.random.default_rng(seed)
    ctx = model.cfg.context_length
    out = []
    groups = [texts] + [
        [rng.integers(0, model.cfg.vocab_size, int(n)).tolist() for n in rng.integers(2, ctx + 1, size)]
        for size in (1, 4)
    ]
    for group in groups:
        width = max(len(t) for t in group)
        ids = np.zeros((len(group), width), dtype=np.int64)
        for row, t in enumerate(group):
            ids[row, : len(t)] = t
        out.append((ids, np.array([len(t) for t in group], dtype=np.int64)))
    return out


@torch.inference_mode()
def check_parity(
    model: GPT, session: ort.InferenceSession, texts: list[list[int]], params: ExportParams, seed: int
) -> dict:
    worst, rows, same = 0.0, 0, 0
    for ids, lengths in _batches(model, texts, seed):
        (onnx,) = session.run([OUTPUT], {"input_ids": ids, "lengths": lengths})
        ref = last_token_logits(model, torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()
        worst = max(worst, float(np.abs(onnx - ref).max()))
        rows, same = rows + len(ids), same + int((onnx.argmax(-1) == ref.argmax(-1)).sum())
    if worst > params.parity_atol or same < rows:
        raise PipelineError(
            f"export parity failed: max |logit(onnxruntime) - logit(torch)| = {worst:.3g} "
            f"(export.parity_atol={params.parity_atol:g}), same class on {same} of {rows} texts; "
            "nothing was exported"
        )
    return {
        "max_abs_logit_diff": worst,
        "texts": rows,
        "same_class": same,
        "atol": params.parity_atol,
        "passed": True,
    }


def export_classifier(
    model: GPT,
    meta: dict,
    tokenizer_dir: Path,
    out_dir: Path,
    texts: list[list[int]],
    params: ExportParams,
    seed: int,
    **metadata: object,
) -> dict:
    """Export a classifier into ``out_dir`` (replaced only when parity holds); the parity metrics."""
    model = model.eval()
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        print(f"export: classifier ({len(meta['labels'])} classes) → ONNX opset {params.opset}")
        export_graph(model, tmp / FILE, params.opset)
        session = ort.InferenceSession(str(tmp / FILE), providers=["CPUExecutionProvider"])
        metrics = {
            "parity": check_parity(model, session, texts, params, seed),
            "size_mb": {"fp32": round((tmp / FILE).stat().st_size / 1e6, 3)},
        }
        write_json(
            tmp / CONFIG,
            {
                "model": model.cfg.to_dict(),
                "labels": meta["labels"],
                "onnx": {
                    "files": {"fp32": FILE},
                    "inputs": list(INPUTS),
                    "outputs": [OUTPUT],
                    "opset": params.opset,
                    "onnxruntime": ort.__version__,
                },
                "tokenizer": {"path": "tokenizer", **meta.get("tokenizer", {})},
                **metadata,
            },
        )
    return metrics
