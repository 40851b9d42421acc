"""What the judge's verdicts add up to: mean scores with bootstrap intervals, the pairwise win rate, the report.

Outputs (written atomically by ``write_outputs``): items.csv (one row per held-out item), metrics.json (DVC
metrics), report.md and scores.png (the score histogram).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.common.atomic import atomic_path, write_json  # noqa: E402


def bootstrap_mean(
    values: np.ndarray, samples: int, seed: int
) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high): the mean and its percentile-bootstrap 95% interval; Nones when there are no values."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return None, None, None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def summarize(
    frame: pd.DataFrame,
    scorer: dict,
    candidates: list[str],
    pairwise: bool,
    bootstrap_samples: int,
    seed: int,
) -> dict:
    """The metrics.json content: per-candidate score statistics, pairwise preference, unparsed counts."""
    metrics: dict = {**scorer, "items": len(frame), "scores": {}}
    unparsed = 0
    for name in candidates:
        status = frame[f"{name}_status"]
        mean, low, high = bootstrap_mean(frame[f"{name}_score"].dropna().to_numpy(), bootstrap_samples, seed)
        metrics["scores"][name] = {
            "mean": _rounded(mean),
            "ci95_low": _rounded(low),
            "ci95_high": _rounded(high),
            "scored": int(frame[f"{name}_score"].notna().sum()),
            "retried": int((status == "retried").sum()),
            "unparsed": int((status == "unparsed").sum()),
        }
        unparsed += metrics["scores"][name]["unparsed"]
    if pairwise:
        a, b = candidates[:2]
        points = frame[f"pair_points_{b}"].dropna().to_numpy()
        rate, low, high = bootstrap_mean(points, bootstrap_samples, seed)
        orders = [f"pair_{a}_first", f"pair_{b}_first"]
        both = frame[orders].dropna().to_numpy(dtype=float)
        # Consistent: the same candidate wins (1 then 2, or 2 then 1), or both orders say tie.
        consistent = ((both[:, 0] == 0) & (both[:, 1] == 0)) | (both.sum(axis=1) == 3)
        answers = frame[orders].to_numpy(dtype=float).ravel()
        decided = answers[~np.isnan(answers) & (answers != 0)]
        pair_unparsed = int(sum((frame[f"{o}_status"] == "unparsed").sum() for o in orders))
        metrics["pairwise"] = {
            "candidates": f"{b} vs {a}",
            f"{b}_win_rate": _rounded(rate),
            "ci95_low": _rounded(low),
            "ci95_high": _rounded(high),
            "items_compared": int(points.size),
            "unparsed": pair_unparsed,
            "consistent_rate": _rounded(float(consistent.mean())) if len(both) else None,
            "first_position_rate": _rounded(float((decided == 1).mean())) if len(decided) else None,
        }
        unparsed += pair_unparsed
    metrics["unparsed_total"] = unparsed
    return metrics


def plot_scores(frame: pd.DataFrame, metrics: dict, candidates: list[str], path: Path) -> None:
    """Overlaid score histograms, one colour per candidate, bins matching the scorer's scale."""
    lo, hi = metrics["scale_min"], metrics["scale_max"]
    bins = np.arange(lo - 0.5, hi + 1.5) if hi - lo <= 10 else np.linspace(lo, hi, 21)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in candidates:
        ax.hist(frame[f"{name}_score"].dropna(), bins=bins, alpha=0.55, label=name)
    ax.set_xlabel(
        "ROUGE-L F1 x 100 (FALLBACK, not an LLM judge)"
        if metrics["fallback"]
        else f"score from {metrics['model']} ({metrics['style']})"
    )
    ax.set_ylabel("items")
    ax.set_title("Judged scores of the held-out responses")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _cell(text: object, width: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_report(frame: pd.DataFrame, metrics: dict, candidates: list[str]) -> str:
    lines = ["# Judged evaluation of the held-out responses", ""]
    if metrics["fallback"]:
        lines += [
            "> **FALLBACK SCORER: NO LLM JUDGED THESE ANSWERS.** The scores are ROUGE-L F1 x 100 against the "
            "reference answers (in-order word overlap), which cannot tell a correct paraphrase from a wrong answer.",
            f"> Why: {metrics['fallback_reason']}",
            "",
        ]
    else:
        lines += [
            f"Judge: `{metrics['model']}` at {metrics['host']}, style `{metrics['style']}` "
            f"({metrics['scale_min']}–{metrics['scale_max']}), temperature {metrics['temperature']:g}, "
            f"seed {metrics['seed']}, num_ctx {metrics['num_ctx']}.",
            "",
        ]
    lines += [
        f"{metrics['items']} items. Means over the parsed scores, with percentile-bootstrap 95% intervals.",
        "",
        "| model | mean | 95% CI | scored | retried | unparsed |",
        "|---|---|---|---|---|---|",
    ]
    for name in candidates:
        s = metrics["scores"][name]
        lines.append(
            f"| {name} | {_fmt(s['mean'], 2)} | {_fmt(s['ci95_low'], 2)}–{_fmt(s['ci95_high'], 2)} | "
            f"{s['scored']} | {s['retried']} | {s['unparsed']} |"
        )
    if pair := metrics.get("pairwise"):
        b = candidates[1]
        lines += [
            "",
            "## Pairwise",
            "",
            f"Each item was compared twice, {candidates[0]} shown first and then {b} shown first; a win "
            "counts 1, a tie 0.5, and the item scores the mean of both orders.",
            "",
            f"- {b} win rate over {candidates[0]}: **{_fmt(pair[f'{b}_win_rate'], 3)}** "
            f"(95% CI {_fmt(pair['ci95_low'], 3)}–{_fmt(pair['ci95_high'], 3)}, "
            f"{pair['items_compared']} items with both orders read, {pair['unparsed']} unparsed answers)",
            f"- both orders agreed: {_fmt(pair['consistent_rate'], 3)}; the first-shown response was "
            f"picked in {_fmt(pair['first_position_rate'], 3)} of decisive answers (0.5 = no position bias)",
        ]
    lines += ["", "![score histogram](scores.png)", ""]
    if len(candidates) >= 2:
        a, b = candidates[:2]
        diff = (frame[f"{b}_score"] - frame[f"{a}_score"]).abs().dropna().sort_values(ascending=False)
        lines += [
            "## Items where the two models' scores differ most",
            "",
            f"| id | instruction | reference | {a} | {a} score | {b} | {b} score |",
            "|---|---|---|---|---|---|---|",
        ]
        for index in diff.index[:5]:
            row = frame.loc[index]
            lines.append(
                f"| {row['id']} | {_cell(row['instruction'], 60)} | {_cell(row['reference'], 40)} | "
                f"{_cell(row[f'{a}_response'], 40)} | {_fmt(row[f'{a}_score'])} | "
                f"{_cell(row[f'{b}_response'], 40)} | {_fmt(row[f'{b}_score'])} |"
            )
    unparsed = frame[[f"{n}_status" for n in candidates]].eq("unparsed").any(axis=1)
    if unparsed.any():
        lines += [
            "",
            "## Unparsed judge answers (kept, not scored)",
            "",
            "| id | model | judge said |",
            "|---|---|---|",
        ]
        for index in frame.index[unparsed][:10]:
            row = frame.loc[index]
            for name in candidates:
                if row[f"{name}_status"] == "unparsed":
                    lines.append(f"| {row['id']} | {name} | {_cell(row[f'{name}_raw'])} |")
    return "\n".join(lines) + "\n"


def write_outputs(frame: pd.DataFrame, metrics: dict, candidates: list[str], directory: str | Path) -> None:
    """items.csv, metrics.json, report.md and scores.png in ``directory``, each written atomically."""
    directory = Path(directory)
    with atomic_path(directory / "items.csv") as tmp:
        frame.to_csv(tmp, index=False)
    plot_scores(frame, metrics, candidates, directory / "scores.png")
    with atomic_path(directory / "report.md") as tmp:
        tmp.write_text(render_report(frame, metrics, candidates), encoding="utf-8")
    write_json(directory / "metrics.json", metrics)
