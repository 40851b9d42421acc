"""Experiment sweeps and comparisons on top of DVC experiments.

    python -m pipeline sweep -S pretrain.lr=0.0005,0.002 [-S model.n_layer=2,4] [--name lr] [-j 1]
    python -m pipeline compare [EXP ...] [--all-metrics] [--rank-by dpo.pipeline_preference.acc]
    python -m pipeline compare --reports ../run-a/reports reports      # two runs' report pages side by side

`sweep` queues one `dvc exp run --queue -S ...` per combination of values and runs the queue with a
bounded number of jobs; `compare` reads `dvc exp show --json` and writes, under reports/compare/, the
params that differ and the key metrics (compare.md, one column per experiment; compare.csv, one row
per experiment) and the loss curves of every experiment overlaid (loss_curves.png). ``--rank-by`` orders
the experiments by one metric, best first (lower first for losses, perplexities and bits per byte).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.common.atomic import atomic_path
from pipeline.common.errors import PipelineError, one_line
from pipeline.common.json_files import flatten
from pipeline.orchestration import dvc_ops

OUT_DIR = Path("reports/compare")
# Key metrics, by the last part of their name: losses, bits per byte, judge scores, DPO reward margins, the
# benchmark's harness accuracies (benchmark: models.<model>.<task>.acc)...
KEY_METRIC = re.compile(
    r"(val_)?loss|perplexity|bits_per_byte|bpb|accurac(y|ies)|acc(_norm)?|margins|mean|\w*win_rate|top1_agreement"
)


@dataclass(frozen=True)
class Experiment:
    name: str
    rev: str  # a git revision (or "workspace") whose tree holds the experiment's files
    kind: str  # "workspace" | "commit" (the baseline) | "experiment"
    params: dict[str, Any]
    metrics: dict[str, Any]
    unavailable: tuple[str, ...] = ()  # metrics files DVC could not read at this revision, with the reason


def _metrics_label(path: str) -> str:
    """reports/evaluate/metrics.json → evaluate; other files by their stem."""
    file = Path(path)
    return file.parent.name if file.name == "metrics.json" else file.stem


def _experiment(name: str, rev: str, kind: str, data: dict) -> Experiment:
    params: dict[str, Any] = {}
    for file, content in (data.get("params") or {}).items():
        prefix = "" if file == "params.yaml" else f"{file}:"
        params.update({f"{prefix}{k}": v for k, v in flatten(content.get("data") or {}, lists=False).items()})
    metrics: dict[str, Any] = {}
    unavailable = []
    for file, content in (data.get("metrics") or {}).items():
        if content.get("error") and not content.get("data"):
            unavailable.append(f"{file} ({_error_text(content['error'])})")
            continue
        label = _metrics_label(file)
        metrics.update(
            {f"{label}: {k}": v for k, v in flatten(content.get("data") or {}, lists=False).items()}
        )
    return Experiment(name, rev, kind, params, metrics, tuple(unavailable))


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("msg") or error.get("type") or "unreadable")
    return str(error)


def load_experiments(project: Path) -> list[Experiment]:
    """The workspace, the current commit and its finished experiments, from `dvc exp show --json`."""
    shown = json.loads(dvc_ops.dvc(project, "exp", "show", "--json").stdout)
    found: list[Experiment] = []
    for entry in shown:
        if entry.get("data"):
            kind = "workspace" if entry["rev"] == "workspace" else "commit"
            name = "workspace" if kind == "workspace" else entry.get("name") or entry["rev"][:7]
            found.append(_experiment(name, entry["rev"], kind, entry["data"]))
        for exp in entry.get("experiments") or []:
            latest = exp["revs"][0]
            if latest.get("data") and not latest.get("error"):
                name = exp.get("name") or latest["rev"][:7]
                found.append(_experiment(name, latest["rev"], "experiment", latest["data"]))
    return found


def select(
    experiments: list[Experiment], names: list[str] | None, with_baseline: bool = False
) -> list[Experiment]:
    """``names`` in order (the baseline commit first if asked); without names, the commit and its experiments."""
    if not names:
        return [e for e in experiments if e.kind != "workspace"]
    by_name = {e.name: e for e in experiments}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise PipelineError(f"no finished experiment '{missing[0]}' (known: {', '.join(by_name)})")
    baseline = [e for e in experiments if e.kind == "commit" and e.name not in names] if with_baseline else []
    return baseline + [by_name[n] for n in names]


def _comparable(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def comparison_table(experiments: list[Experiment], all_metrics: bool = False) -> pd.DataFrame:
    """One row per experiment: the params whose values differ between them, then the (key) metrics."""
    params = pd.DataFrame([e.params for e in experiments], index=[e.name for e in experiments])
    changed = [c for c in params.columns if params[c].map(_comparable).nunique() > 1]
    metrics = pd.DataFrame([e.metrics for e in experiments], index=params.index)
    metrics = metrics[[c for c in metrics.columns if pd.api.types.is_numeric_dtype(metrics[c])]]
    keys = [c for c in metrics.columns if KEY_METRIC.fullmatch(c.rsplit(".", 1)[-1].split(": ")[-1])]
    shown = list(metrics.columns) if all_metrics or not keys else keys
    table = pd.concat([params[changed], metrics[shown]], axis=1)
    table.index.name = "experiment"
    return table


# Metrics where lower is better, by the last part of their name; every other ranked metric is higher-better.
LOWER_IS_BETTER = re.compile(r"(val_)?loss|perplexity|bits_per_byte|bpb|\w*_stderr|\w*seconds")


def rank(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``table`` ordered by ``metric`` (a column, or the one column whose name ends with it), best first, with
    a ``rank`` column in front; experiments without the metric come last, unranked."""
    columns = [c for c in table.columns if c == metric] or [c for c in table.columns if c.endswith(metric)]
    if len(columns) != 1:
        known = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
        found = (
            f"it matches {len(columns)}: {', '.join(columns)}" if columns else f"known: {', '.join(known)}"
        )
        raise PipelineError(f"compare --rank-by {metric!r}: name one metric column ({found})")
    column = columns[0]
    if not pd.api.types.is_numeric_dtype(table[column]):
        raise PipelineError(f"compare --rank-by {metric!r}: {column} is not a number")
    ascending = bool(LOWER_IS_BETTER.fullmatch(column.rsplit(".", 1)[-1].split(": ")[-1]))
    ranked = table.sort_values(column, ascending=ascending, na_position="last", kind="stable")
    ranks = ranked[column].rank(ascending=ascending, method="min")
    ranked.insert(0, f"rank by {column}", ranks)  # NaN (shown empty) where the metric is missing
    return ranked


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value).replace("|", "\\|")


def markdown_table(table: pd.DataFrame) -> str:
    """One column per experiment, one row per param/metric: reads well with few runs and many metrics."""
    names = [str(n) for n in table.index]
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for column in table.columns:
        lines.append(f"| {column} | " + " | ".join(_cell(v) for v in table[column]) + " |")
    return "\n".join(lines)


def _tsv_files(fs: Any, directory: str) -> list[str]:
    """The loss TSVs under ``directory`` at one revision (dvclive writes plots/metrics/<split>/<name>.tsv)."""
    if not fs.exists(directory):
        return []
    return sorted(p for p in fs.find(directory) if p.endswith(".tsv") and "loss" in Path(p).stem)


def loss_curves(
    project: Path, experiments: list[Experiment], plot_dirs: list[str], unavailable: list[str] | None = None
) -> dict[str, dict[str, pd.DataFrame]]:
    """{"pretrain: train/loss": {experiment: DataFrame(step, value)}} from the TSVs in the plots dirs.

    A plots directory DVC cannot read at a revision (its outputs are in no cache here: a commit made on another
    machine) is skipped; ``unavailable`` collects "experiment: directory (why)".
    """
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException
    from dvc_data.index.index import DataIndexError

    curves: dict[str, dict[str, pd.DataFrame]] = {}
    for exp in experiments:
        # DVC's view of the revision: files in its git tree and the uncached outputs DVC keeps for experiments
        fs = DVCFileSystem(str(project), rev=None if exp.kind == "workspace" else exp.rev)
        for directory in plot_dirs:
            stage = Path(directory).parts[1] if directory.startswith("reports/") else directory
            try:
                texts = {path: fs.read_text(path) for path in _tsv_files(fs, directory)}
            except (OSError, DvcException, DataIndexError) as exc:
                if unavailable is not None:
                    unavailable.append(f"{exp.name}: {directory} ({_missing_reason(exc)})")
                continue
            for path, text in texts.items():
                frame = pd.read_csv(io.StringIO(text), sep="\t")
                values = [c for c in frame.columns if c not in ("step", "timestamp")]
                if frame.empty or "step" not in frame.columns or not values:
                    continue
                label = f"{stage}: {Path(os.path.relpath(path, directory)).with_suffix('').as_posix()}"
                curves.setdefault(label, {})[exp.name] = frame[["step", values[-1]]]
    return curves


def _missing_reason(exc: Exception) -> str:
    from dvc_data.index.index import DataIndexDirError

    # The revision's .dir object is not in the cache.
    if isinstance(exc, FileNotFoundError | DataIndexDirError):
        return "not in this machine's DVC cache"
    return one_line(f"{type(exc).__name__}: {exc}")


def plot_curves(curves: dict[str, dict[str, pd.DataFrame]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(curves))
    rows = -(-len(curves) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.6 * rows), squeeze=False)
    for ax, (label, by_exp) in zip(axes.flat, curves.items(), strict=False):
        for name, frame in by_exp.items():
            ax.plot(frame.iloc[:, 0], frame.iloc[:, 1], label=name)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(curves) :]:
        ax.set_visible(False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def compare(
    project: Path,
    names: list[str] | None = None,
    all_metrics: bool = False,
    with_baseline: bool = False,
    rank_by: str | None = None,
) -> tuple[str, list[Path]]:
    """Write reports/compare/{compare.md, compare.csv, loss_curves.png}; returns (markdown, files written)."""
    experiments = select(load_experiments(project), names, with_baseline)
    if len(experiments) < 2:
        raise PipelineError(f"{project}: need at least two experiments to compare, found {len(experiments)}")
    table = comparison_table(experiments, all_metrics)
    if rank_by:
        table = rank(table, rank_by)
    out = project / OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "compare.csv") as tmp:
        table.to_csv(tmp)
    plot_dirs = [p for s in dvc_ops.read_stages(project) for p in s.plots]
    unavailable = [f"{e.name}: {item}" for e in experiments for item in e.unavailable]
    curves = loss_curves(project, experiments, plot_dirs, unavailable)
    plot = out / "loss_curves.png"
    if curves:
        plot_curves(curves, plot)
    else:
        plot.unlink(missing_ok=True)  # an older comparison's curves would mislead
    revs = " ".join(e.name for e in experiments if e.kind != "workspace")
    lines = [
        "# Experiment comparison",
        "",
        "Params that differ between the experiments, and their key metrics (`dvc exp show --json`).",
        "",
        markdown_table(table),
        "",
    ]
    if curves:
        lines += ["![loss curves](loss_curves.png)", ""]
    lines += [f"Every plot, interactive: `dvc plots diff {revs} --open`", ""]
    if unavailable:
        lines += [
            "## Unavailable",
            "",
            "DVC could not read these outputs at their revision. A commit's outputs live in the DVC cache of "
            "the machine that ran it: `dvc pull` them from a remote that has them, or make your own run the "
            "baseline (`dvc repro`, then `git add dvc.lock reports && git commit`).",
            "",
            *(f"- {item}" for item in unavailable),
            "",
        ]
    markdown = "\n".join(lines)
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    return markdown, [out / "compare.md", out / "compare.csv", *([plot] if curves else [])]


def cli_compare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline compare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "experiments", nargs="*", help="experiment names (default: the commit and all its experiments)"
    )
    parser.add_argument(
        "--all-metrics", action="store_true", help="every numeric metric, not only the key ones"
    )
    parser.add_argument("--project", default=".", help="DVC project directory (default: .)")
    parser.add_argument(
        "--rank-by",
        metavar="METRIC",
        help="order the experiments by this metric, best first (a column, or the end of its name, "
        "e.g. dpo.pipeline_preference.acc)",
    )
    parser.add_argument(
        "--reports",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="instead: two or more runs' reports/ folders side by side (written to reports/compare/reports.html)",
    )
    args = parser.parse_args(argv)
    if args.reports is not None:
        from pipeline.orchestration.report import compare_runs

        if len(args.reports) < 2 or args.experiments:
            raise PipelineError(
                "compare --reports: give two or more reports/ folders (and no experiment names)"
            )
        markdown, files = compare_runs(args.reports, Path(args.project) / OUT_DIR)
    else:
        markdown, files = compare(
            Path(args.project).resolve(), args.experiments or None, args.all_metrics, rank_by=args.rank_by
        )
    print(markdown)
    print("written: " + ", ".join(str(f) for f in files))
    return 0


def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """Expand `key=a,b` overrides into the grid of single-value override lists (DVC's own -S grammar)."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps

    grid = get_hydra_sweeps(to_path_overrides(overrides))
    return [
        [
            item if path == "params.yaml" else f"{path}:{item}"
            for path, items in variant.items()
            for item in items
        ]
        for variant in grid
    ]


def sweep(project: Path, overrides: list[str], prefix: str, jobs: int) -> list[str]:
    """Queue one DVC experiment per variant, run the queue with ``jobs`` workers; returns their names."""
    dvc_ops.require_experiment_files_tracked(project, dvc_ops.read_stages(project))
    variants = sweep_variants(overrides)
    names = [f"{prefix}-{i}" for i in range(1, len(variants) + 1)]
    clash = [n for n in names if dvc_ops.experiment_exists(project, n)]
    if clash:
        raise PipelineError(f"experiment '{clash[0]}' already exists: pick another --name")
    for name, variant in zip(names, variants, strict=False):
        dvc_ops.dvc(
            project, "exp", "run", "--queue", "--name", name, *itertools.chain(*(("-S", v) for v in variant))
        )
        print(f"queued {name}: {' '.join(variant)}")
    done = dvc_ops.dvc(project, "exp", "run", "--run-all", "--jobs", str(jobs), check=False)
    failed = [n for n in names if not dvc_ops.experiment_exists(project, n)]
    if failed:
        raise PipelineError(
            f"experiment '{failed[0]}' failed: {dvc_ops.error_line(done.stdout + done.stderr)} "
            f"(details: dvc queue logs {failed[0]})"
        )
    return names


def cli_sweep(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline sweep", description="Run a grid of DVC experiments."
    )
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="params override; comma-separated values sweep (repeat for a grid)",
    )
    parser.add_argument(
        "--name", default="sweep", help="experiment name prefix: NAME-1, NAME-2, ... (default: sweep)"
    )
    parser.add_argument("-j", "--jobs", type=int, default=1, help="experiments run at once (default 1)")
    parser.add_argument("--project", default=".", help="DVC project directory (default: .)")
    args = parser.parse_args(argv)
    if not 1 <= args.jobs <= (os.cpu_count() or 1):
        raise PipelineError(
            f"--jobs must be between 1 and {os.cpu_count() or 1} (CPUs here), got {args.jobs}"
        )
    project = Path(args.project).resolve()
    names = sweep(project, args.overrides, args.name, args.jobs)
    markdown, files = compare(project, names, with_baseline=True)
    print(markdown)
    print("written: " + ", ".join(str(f) for f in files))
    return 0
