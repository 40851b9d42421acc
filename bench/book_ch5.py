"""The book's chapter 5 figure, reproduced: params-book-ch5.yaml pretrained on The Verdict, next to the book's log.

    python -m bench.book_ch5 --workdir /tmp/ch5      # both regimes (≈ 20 min each on 2 cores), plot, tolerance check

Two regimes, each a clone of this repository running the real stages (`dvc repro pretrain`):
  book    params-book-ch5.yaml as it stands: epochs of non-overlapping windows, PyTorch's default init;
  random  the same model, data and optimizer, with this project's defaults for the two options the book does not
          have: windows at random offsets (`pretrain.sampling: random`) and GPT-2's init, for the same 90 steps.
A finished regime is a no-op on a second call (DVC), so the plot can be redrawn cheaply. The tolerance the book
regime is held to is TOLERANCE below, against the validation losses the book prints (its ch05 log, copied as
numbers); copies of that notebook run on other hardware print validation losses 0.3 apart at the same step.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.common.profile import merge_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VERDICT = ROOT.parent / "shared" / "data" / "the-verdict.txt"
# The book's printed log (ch05, train_model_simple, eval_freq 5): (global step, train loss, val loss). Its step 0 is
# the evaluation after the first update, so book step k is our step k + 1.
BOOK_LOG = [
    (0, 9.781, 9.933),
    (5, 8.111, 8.339),
    (10, 6.661, 7.048),
    (15, 5.961, 6.616),
    (20, 5.726, 6.600),
    (25, 5.201, 6.348),
    (30, 4.417, 6.278),
    (35, 4.069, 6.226),
    (40, 3.732, 6.160),
    (45, 2.850, 6.179),
    (50, 2.427, 6.141),
    (55, 2.104, 6.134),
    (60, 1.882, 6.233),
    (65, 1.320, 6.238),
    (70, 0.985, 6.242),
    (75, 0.717, 6.293),
    (80, 0.541, 6.393),
    (85, 0.391, 6.452),
]
# What the book regime is held to: its final and lowest validation loss, each validation loss from step 25 on (past
# the steep first epochs, where one step of difference moves the loss by ~0.3), and the final model's train loss in
# eval mode over the train windows (the book's "Train loss": eval mode, first 5 batches of the shuffled loader).
TOLERANCE = {
    "final val loss": (6.452, 0.3),
    "lowest val loss": (6.134, 0.3),
    "val loss from step 25": (None, 0.3),
    "final train loss (eval mode)": (0.391, 0.3),
}
FROM_STEP = 25
REGIMES = {
    "book": {},
    "random": {
        "pretrain": {"sampling": "random", "stride": None, "epochs": None, "max_steps": 90},
        "model": {"init": "gpt2"},
    },
}


def run_regime(project: Path, overrides: dict) -> None:
    """Clone (first time), write the regime's params, `dvc repro pretrain` (a no-op when already done)."""
    if not project.exists():
        subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
    params = merge_params(
        merge_params(
            yaml.safe_load((ROOT / "params.yaml").read_text()),
            yaml.safe_load((ROOT / "params-book-ch5.yaml").read_text()),
        ),
        overrides,
    )
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if VERDICT.is_file():  # the profile's URL + sha256, served from the download cache when offline
        subprocess.run(
            [sys.executable, "-m", "pipeline", "cache", "add", str(VERDICT)], cwd=project, check=True
        )
    subprocess.run([sys.executable, "-m", "dvc", "repro", "pretrain"], cwd=project, check=True)


def read_curve(project: Path, split: str) -> list[tuple[int, float]]:
    path = project / "reports/pretrain/plots/metrics" / split / "loss.tsv"
    with path.open() as f:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(f, delimiter="\t")]


def train_loss_eval_mode(project: Path) -> float:
    """models/base on every non-overlapping train window, dropout off: what the book prints as its train loss."""
    import torch

    from pipeline.data.shards import ShardDataset
    from pipeline.model.checkpoint import load_model
    from pipeline.train.losses import lm_loss

    model, _ = load_model(project / "models/base")
    context = model.cfg.context_length
    train = ShardDataset(project / "data/shards", "train")
    x, y = train.windows(train.strided(context, context), context)
    with torch.no_grad():
        return float(lm_loss(model(x)[0], y))


def check(
    curves: dict[str, list[tuple[int, float]]], train_eval: float
) -> list[tuple[str, float, float, float, bool]]:
    """(what, ours, book, tolerance, within) for the book regime; book step k is compared with our step k."""
    val = dict(curves["val"])
    book_val = {step: v for step, _, v in BOOK_LOG}
    worst = max((abs(val[s] - book_val[s]), s) for s in val if s >= FROM_STEP and s in book_val)
    ours = {
        "final val loss": curves["val"][-1][1],
        "lowest val loss": min(val.values()),
        "val loss from step 25": val[worst[1]],
        "final train loss (eval mode)": train_eval,
    }
    book = {**{k: b for k, (b, _) in TOLERANCE.items()}, "val loss from step 25": book_val[worst[1]]}
    return [
        (what, ours[what], book[what], tol, abs(ours[what] - book[what]) <= tol)
        for what, (_, tol) in TOLERANCE.items()
    ]


def plot(results: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), sharey=True)
    titles = {
        "book": "book regime: epochs of fixed windows, PyTorch init",
        "random": "random windows, GPT-2 init (this project's default)",
    }
    for ax, (name, curves) in zip(axes, results.items(), strict=True):
        ax.plot(*zip(*curves["train"], strict=True), lw=1, label="train loss (per step)")
        ax.plot(*zip(*curves["val"], strict=True), "o-", ms=3, label="validation loss")
        ax.plot([s + 1 for s, _, _ in BOOK_LOG], [t for _, t, _ in BOOK_LOG], "k+", label="book: train loss")
        ax.plot(
            [s + 1 for s, _, _ in BOOK_LOG], [v for _, _, v in BOOK_LOG], "kx", label="book: validation loss"
        )
        ax.set_title(titles[name], fontsize=10)
        ax.set_xlabel("optimizer step (9 per epoch)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy loss")
    axes[0].legend(fontsize=8)
    fig.suptitle("The Verdict, GPT_CONFIG_124M at context 256, AdamW 4e-4, batch 2, 90 steps")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="one clone per regime lives here")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/images/book-ch5-curves.png")
    args = parser.parse_args()
    results = {}
    for name, overrides in REGIMES.items():
        project = args.workdir / name
        run_regime(project, overrides)
        results[name] = {split: read_curve(project, split) for split in ("train", "val")}
    plot(results, args.plot)
    for name, curves in results.items():
        print(f"{name}: val loss " + " ".join(f"{s}:{v:.3f}" for s, v in curves["val"]))
    rows = check(results["book"], train_loss_eval_mode(args.workdir / "book"))
    for what, ours, book, tol, ok in rows:
        print(
            f"book regime, {what}: ours {ours:.3f}, book {book:.3f}, tolerance ±{tol} -> {'within' if ok else 'OUTSIDE'}"
        )
    print(f"plot: {args.plot}")
    sys.exit(0 if all(ok for *_, ok in rows) else 1)


if __name__ == "__main__":
    main()
