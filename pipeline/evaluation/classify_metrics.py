"""How well a classifier does: accuracy, per-class precision/recall/F1, macro-F1, confusion matrix, and the
majority-class baseline that any of it must beat, on every split."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from pipeline.common.atomic import atomic_path
from pipeline.model.gpt import GPT
from pipeline.train.classifier import Encoded, predict


def confusion(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> list[list[int]]:
    """``matrix[true][predicted]`` counts."""
    matrix = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(y_true, y_pred, strict=True):
        matrix[t][p] += 1
    return matrix


def scores(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str], majority: int) -> dict:
    """Accuracy, macro-F1, per-class P/R/F1 (0 where undefined), and the accuracy of always answering ``majority``."""
    matrix = confusion(y_true, y_pred, len(labels))
    n = max(1, len(y_true))
    per_class = {}
    for k, label in enumerate(labels):
        tp = matrix[k][k]
        predicted = sum(row[k] for row in matrix)
        actual = sum(matrix[k])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return {
        "accuracy": sum(matrix[k][k] for k in range(len(labels))) / n,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(labels),
        "majority_baseline": sum(1 for t in y_true if t == majority) / n,
        "n": len(y_true),
        "per_class": per_class,
    }


def majority_class(y_train: Sequence[int]) -> int:
    """The most frequent training label (the smallest id on a tie)."""
    counts = Counter(y_train)
    return min(counts, key=lambda k: (-counts[k], k))


def plot_confusion(matrix: list[list[int]], labels: Sequence[str], path: Path, title: str) -> None:
    """A confusion-matrix PNG (rows: true class, columns: predicted), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def evaluate_splits(
    model: GPT, splits: dict[str, Encoded], labels: Sequence[str], pad_id: int, batch_size: int
) -> dict[str, dict]:
    """Scores of every split against the majority class of the training split, with its confusion matrix."""
    majority = majority_class(splits["train"].labels)
    out = {}
    for name, data in splits.items():
        predicted = predict(model, data.ids, pad_id, batch_size).argmax(-1).tolist()
        out[name] = {
            **scores(data.labels, predicted, labels, majority),
            "confusion": confusion(data.labels, predicted, len(labels)),
        }
    return out
