"""A served model's card: what it is, what it was trained on, and how it scored, for the chat page.

Read from what the stages already wrote: the model directory's ``config.json`` (stage, shape, instruction recipe,
training summary) and, when the model sits in a project (``<project>/models/<name>``), the stage's metrics in
``<project>/reports/<stage>/metrics.json`` and the corpus sources in ``<project>/data/raw/manifest.json``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.common.errors import PipelineError
from pipeline.common.json_files import flatten, read_json

# The metrics worth a glance, by the last part of their key (the rest are in the reports).
KEY_METRICS = (
    "val_loss",
    "perplexity",
    "bits_per_byte",
    "unigram_loss",
    "accuracy",
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "max_abs_logit_diff",
    "top1_agreement",
    "greedy_tokens_matched",
)
STAGE_REPORTS = {"pretrain": "evaluate", "sft": "sft", "dpo": "dpo", "export": "export"}


def _json(path: Path) -> dict:
    """What the card can show from ``path``: a missing or broken file leaves its part of the card empty."""
    try:
        return read_json(path, "JSON file")
    except PipelineError:
        return {}


def key_metrics(metrics: dict) -> dict[str, float]:
    return {
        k: v
        for k, v in flatten(metrics, sep="/").items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k.split("/", 1)[-1] in KEY_METRICS
    }


def training_data(config: dict, project: Path | None) -> list[str]:
    """Where the model's training text came from: the instruction file for SFT/DPO, the corpus for pretraining."""
    recipe = config.get("instructions") or {}
    sources = (
        [f"{recipe['data']} (sha256 {recipe.get('data_sha256', '?')[:12]}…)"] if recipe.get("data") else []
    )
    manifest = _json(project / "data" / "raw" / "manifest.json") if project else {}
    listed = manifest.get("sources") or []  # the download stage's per-source table
    corpus = list(
        dict.fromkeys(str(d.get("source")) for d in listed if isinstance(d, dict) and d.get("source"))
    )
    mid = (config.get("training") or {}).get("mid_training")
    return sources + [f"corpus: {source}" for source in corpus] + ([f"mid-training: {mid}"] if mid else [])


def served_model_card(directory: str | Path, size_bytes: int, parameter_size: str | None) -> dict:
    """The card of the model served from ``directory`` (a torch model directory or the ONNX export)."""
    directory = Path(directory).resolve()
    config = _json(directory / "config.json")
    stage = config.get("stage") or ("export" if "onnx" in config else None)
    if stage == "export":  # the export's recipe is the tuned model's it came from
        source = Path(str((config.get("source") or {}).get("directory") or ""))
        tuned = _json((source if source.is_absolute() else directory.parent.parent / source) / "config.json")
        config = {**tuned, **{k: v for k, v in config.items() if k != "instructions"}}
        config.setdefault("instructions", tuned.get("instructions"))
    project = directory.parent.parent if directory.parent.name == "models" else None
    metrics_file = (
        project / "reports" / STAGE_REPORTS[stage] / "metrics.json"
        if project and stage in STAGE_REPORTS
        else None
    )
    shape = config.get("model") or {}
    return {
        "stage": stage or "unknown",
        "parameters": parameter_size,
        "size_mb": round(size_bytes / 1e6, 2),
        "shape": {
            k: shape[k] for k in ("n_layer", "n_head", "n_embd", "context_length", "vocab_size") if k in shape
        },
        "template": (config.get("instructions") or {}).get("template") or "raw text (no template)",
        "training_data": training_data(config, project),
        "training": config.get("training") or {},
        "metrics": key_metrics(_json(metrics_file)) if metrics_file else {},
        "metrics_file": str(metrics_file) if metrics_file and metrics_file.is_file() else None,
    }
