"""Model cards read from what the stages wrote: a base model (corpus, evaluation) and an ONNX export of a tuned one."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.serve.model_card import served_model_card


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


SHAPE = {"n_layer": 2, "n_head": 4, "n_embd": 64, "context_length": 96, "vocab_size": 272, "dropout": 0.0}


def test_base_model_card_names_the_corpus_and_the_evaluation(tmp_path):
    write(
        tmp_path / "models/base/config.json", {"model": SHAPE, "stage": "pretrain", "training": {"steps": 6}}
    )
    write(
        tmp_path / "data/raw/manifest.json",
        {
            "files": {"corpus.txt": {"bytes": 10}},
            "sources": [
                {"source": "inputs/corpus.txt", "documents": 1},
                {"source": "books/b.txt", "documents": 2},
                {"source": "inputs/corpus.txt", "documents": 1},
            ],
        },
    )
    write(tmp_path / "reports/evaluate/metrics.json", {"val_loss": 5.1, "unigram_loss": 5.5, "tokens": 512})
    card = served_model_card(tmp_path / "models/base", 2_500_000, "0.1M")
    assert card["stage"] == "pretrain" and card["size_mb"] == 2.5 and card["parameters"] == "0.1M"
    assert card["training_data"] == ["corpus: inputs/corpus.txt", "corpus: books/b.txt"]
    assert card["metrics"] == {"val_loss": 5.1, "unigram_loss": 5.5} and card["training"] == {"steps": 6}
    assert card["template"] == "raw text (no template)" and card["shape"]["context_length"] == 96


def test_export_card_takes_the_recipe_of_the_model_it_came_from(tmp_path):
    write(
        tmp_path / "models/dpo/config.json",
        {
            "model": SHAPE,
            "stage": "dpo",
            "instructions": {"template": "chat", "data": "data/raw/dpo.json", "data_sha256": "cd" * 32},
        },
    )
    write(
        tmp_path / "models/onnx/config.json",
        {"model": SHAPE, "onnx": {"opset": 23}, "source": {"directory": "models/dpo"}},
    )
    write(
        tmp_path / "reports/export/metrics.json",
        {"parity": {"max_abs_logit_diff": 3e-7, "calls": 20}, "int8": {"top1_agreement": 0.99}},
    )
    card = served_model_card(tmp_path / "models/onnx", 600_000, None)
    assert card["stage"] == "export" and card["template"] == "chat"
    assert card["training_data"] == [f"data/raw/dpo.json (sha256 {'cd' * 6}…)"]
    assert card["metrics"] == {"parity/max_abs_logit_diff": 3e-7, "int8/top1_agreement": 0.99}


def test_a_model_outside_a_project_has_no_metrics(tmp_path):
    write(tmp_path / "elsewhere/config.json", {"model": SHAPE})
    card = served_model_card(tmp_path / "elsewhere", 1000, None)
    assert card["metrics"] == {} and card["metrics_file"] is None and card["stage"] == "unknown"
