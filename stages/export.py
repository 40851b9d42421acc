"""export stage: models/<export.model> → models/onnx (parity checked against torch), models/gguf (+ Ollama Modelfile;
checked in llama.cpp, in a child process) and models/hf (checked through transformers), as export.formats lists."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.common import config
from pipeline.common.atomic import atomic_path, write_json
from pipeline.common.errors import exit_on_error
from pipeline.common.provenance import provenance
from pipeline.common.stage_timing import timed
from pipeline.export.gguf import export_gguf
from pipeline.export.hf import export_hf_model
from pipeline.export.onnx import check_params, export_model

TOKENIZER = Path("data/tokenizer")
SHARDS = Path("data/shards")
OUT = {"onnx": Path("models/onnx"), "gguf": Path("models/gguf"), "hf": Path("models/hf")}
METRICS = Path("reports/export/metrics.json")
PARAMS = ("seed", "export")


def not_exported(fmt: str, formats: tuple[str, ...]) -> None:
    """A format left out of export.formats still leaves its (declared) output: a directory that says why."""
    with atomic_path(OUT[fmt]) as tmp:
        tmp.mkdir()
        (tmp / "README.md").write_text(
            f"Not exported: export.formats is {list(formats)}.\n", encoding="utf-8"
        )


def onnx_line(metrics: dict) -> str:
    parity = metrics["parity"]
    if "same_class" in parity:
        return (
            f"export: classifier parity max |Δlogit| {parity['max_abs_logit_diff']:.2e}, same class on "
            f"{parity['same_class']}/{parity['texts']} texts → {OUT['onnx']}/"
        )
    int8 = f", int8 top-1 agreement {metrics['int8']['top1_agreement']:.1%}" if "int8" in metrics else ""
    return (
        f"export: parity max |Δlogit| {parity['max_abs_logit_diff']:.2e}, greedy {parity['greedy_tokens_matched']} "
        f"tokens equal{int8} → {OUT['onnx']}/ ({', '.join(f'{k} {v} MB' for k, v in metrics['size_mb'].items())})"
    )


def hf_line(hf: dict) -> str:
    return (
        f"export: transformers max |Δlogit| {hf['max_abs_logit_diff']:.2e}, tokenizer agreement "
        f"{hf['tokenizer_agreement']:.0%} of {hf['tokenizer_texts']} texts, greedy {hf['greedy_tokens_matched']} "
        f"tokens equal → {OUT['hf']}/"
    )


def gguf_line(gguf: dict) -> str:
    checked = ", ".join(
        f"{t} top-1 {gguf[t]['top1_agreement']:.1%}" if gguf[t]["passed"] else f"{t} UNVERIFIED"
        for t in gguf["files"]
        if t in gguf
    )
    verified = f"verified by {gguf['verified_by']}: {checked}" if gguf["verified_by"] else gguf["unverified"]
    return f"export: {', '.join(gguf['files'].values())} → {OUT['gguf']}/; {verified}"


@exit_on_error
@timed
def main() -> None:
    params = config.load_params(sections=PARAMS)
    p = params.export
    model_dir = Path("models") / p.model
    metrics: dict = {"formats": list(p.formats)}
    if {"onnx", "hf"} & set(p.formats):
        check_params(p, model_dir)  # a params mistake fails before any format's work
    if (
        "gguf" in p.formats
    ):  # first: it refuses what it cannot export (a char tokenizer, a classifier) at once
        metrics["gguf"] = export_gguf(model_dir, TOKENIZER, SHARDS, OUT["gguf"], p)
    if "onnx" in p.formats:
        metrics |= export_model(
            model_dir, TOKENIZER, SHARDS, OUT["onnx"], p, params.seed, provenance=provenance(PARAMS)
        )
        print(onnx_line(metrics), file=sys.stderr)
    if "gguf" in metrics:
        print(gguf_line(metrics["gguf"]), file=sys.stderr)
    if "hf" in p.formats:
        metrics["hf"] = export_hf_model(
            model_dir, TOKENIZER, SHARDS, OUT["hf"], p, provenance=provenance(PARAMS)
        )
        print(hf_line(metrics["hf"]), file=sys.stderr)
    for fmt in set(OUT) - set(p.formats):
        not_exported(fmt, p.formats)
    write_json(METRICS, metrics)


if __name__ == "__main__":
    main()
