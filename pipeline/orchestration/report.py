"""One page per run: every stage's reports gathered into ``reports/README.md`` and a self-contained
``reports/index.html`` (plots embedded), readable without DVC.

Generic by design: it walks ``reports/<stage>/`` for the stages of ``dvc.yaml`` (in pipeline order, then any other
report folder) and renders what it finds by kind — ``metrics.json`` as a table, images, ``samples.json``,
``responses.jsonl`` (answers beside the references, every tuned model side by side), the stage's own
``report.md``, dvclive curves (``plots/**/*loss*.tsv``), ``timing.json`` (wall time, see ``stage_timing``) — so a
stage added later appears without editing this module. Metrics named ``unigram_loss`` and a ``fallback`` flag
get a line at the top, wherever they come from.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.common.atomic import atomic_path
from pipeline.common.config import read_yaml
from pipeline.common.errors import PipelineError
from pipeline.common.json_files import flatten, read_json, read_jsonl
from pipeline.common.provenance import git_state, package_versions, params_hash
from pipeline.common.stage_timing import TIMING_FILE
from pipeline.evaluation.answer_figures import answer_figures

SKIP_DIRS = {"report", "compare"}  # this stage's own folder, and comparisons of several runs
ANSWER_ROWS = 5  # held-out answers shown per run
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


@dataclass
class StageReport:
    """What one stage left in ``reports/<name>/``."""

    name: str
    directory: Path
    metrics: dict = field(default_factory=dict)
    timing: dict | None = None
    images: list[Path] = field(default_factory=list)
    curves: dict[str, list[tuple[float, float]]] = field(
        default_factory=dict
    )  # "train/loss" → [(step, value)]
    samples: list[dict] = field(default_factory=list)
    responses: list[dict] = field(default_factory=list)
    markdown: str | None = None
    other: list[Path] = field(default_factory=list)


def _json(path: Path) -> Any:
    """A stage's JSON file; a corrupt one is an error naming it (the page must not quietly drop a stage's numbers)."""
    return read_json(path, "stage report", "rerun the stage that writes it", shape=object)


def _curve(path: Path) -> list[tuple[float, float]]:
    """A dvclive TSV (step, value[, timestamp]) as points."""
    points = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines[1:]:
        cells = line.split("\t")
        try:
            points.append((float(cells[0]), float(cells[1])))
        except (IndexError, ValueError):
            continue
    return points


def read_stage(name: str, directory: Path) -> StageReport:
    stage = StageReport(name, directory)
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
        relative = path.relative_to(directory)
        if path.name == "metrics.json" and relative.parent == Path("."):
            stage.metrics = metrics if isinstance(metrics := _json(path), dict) else {"value": metrics}
        elif path.name == TIMING_FILE:
            stage.timing = _json(path)
        elif path.suffix == ".tsv" and "loss" in path.stem:
            stage.curves[str(relative.with_suffix("")).split("metrics/", 1)[-1]] = _curve(path)
        elif path.suffix == ".tsv":
            continue  # other dvclive curves (lr, tokens/s, rewards): `dvc plots show` draws them
        elif path.suffix in (".png", ".svg", ".jpg"):
            stage.images.append(path)
        elif path.name == "samples.json":
            stage.samples = (
                [s for s in _json(path) if isinstance(s, dict)] if isinstance(_json(path), list) else []
            )
        elif path.name == "responses.jsonl":
            stage.responses = [r for _, r in read_jsonl(path, "responses file") if isinstance(r, dict)]
        elif path.name == "report.md":
            stage.markdown = path.read_text(encoding="utf-8")
        else:
            stage.other.append(path)
    return stage


def collect(reports: Path, stage_order: list[str]) -> list[StageReport]:
    """The stage folders under ``reports`` (those of ``stage_order`` first, in that order)."""
    folders = (
        {p.name: p for p in reports.iterdir() if p.is_dir() and p.name not in SKIP_DIRS}
        if reports.is_dir()
        else {}
    )
    names = [n for n in stage_order if n in folders] + sorted(set(folders) - set(stage_order))
    return [read_stage(name, folders[name]) for name in names]


def cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.6g}"
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= 160 else text[:159] + "…"


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        f"| {' | '.join(headers)} |",
        f"|{'---|' * len(headers)}",
        *(f"| {' | '.join(cell(c) for c in r)} |" for r in rows),
    ]


# ---------------------------------------------------------------------------------------------- the page


def highlights(stages: list[StageReport]) -> list[str]:
    """Lines worth reading first: warnings (a fallback scorer) and the model against the unigram baseline."""
    lines = []
    for stage in stages:
        metrics = flatten(stage.metrics)
        if metrics.get("fallback") is True:
            reason = " ".join(str(metrics.get("fallback_reason", "")).split())
            lines.append(
                f"> **Warning ({stage.name}): the fallback scorer {metrics.get('scorer', '')} was used, not "
                f"the configured one.** {reason}"
            )
        for key, value in metrics.items():
            if key.endswith("unigram_loss") and isinstance(value, (int, float)):
                model = metrics.get(key.replace("unigram_loss", "val_loss"))
                if isinstance(model, (int, float)):
                    below = value - model
                    lines.append(
                        f"- **{stage.name}**: validation loss {model:.4f} nats/token against the unigram "
                        f"baseline's {value:.4f}: {abs(below):.4f} {'below' if below > 0 else 'ABOVE'} it."
                    )
    return lines


def stage_times(stages: list[StageReport]) -> list[str]:
    rows = [[s.name, s.timing.get("seconds"), s.timing.get("finished_at", "")] for s in stages if s.timing]
    if not rows:
        return ["No stage recorded its time (stages restored from DVC's cache do not run)."]
    total = sum(r[1] for r in rows if isinstance(r[1], (int, float)))
    return table(["stage", "seconds", "finished (UTC)"], rows + [["total", round(total, 2), ""]])


def answers(stages: list[StageReport]) -> list[str]:
    """The held-out answers of every stage that wrote ``responses.jsonl``, side by side with the reference."""
    tuned = [s for s in stages if s.responses]
    if not tuned:
        return []
    by_id = {s.name: {r.get("id"): r for r in s.responses} for s in tuned}
    first = tuned[0].responses[:ANSWER_ROWS]
    rows = []
    for item in first:
        prompt = item.get("instruction", "") + (f" — {item['input']}" if item.get("input") else "")
        rows.append(
            [
                item.get("id"),
                prompt,
                item.get("output", ""),
                *(by_id[s.name].get(item.get("id"), {}).get("response", "") for s in tuned),
            ]
        )
    figures = {s.name: answer_figures(s.responses) for s in tuned}
    return [
        "## Answers to held-out instructions",
        "",
        *expectations(stages),
        "",
        f"All {len(tuned[0].responses)} held-out answers of each stage, in figures (`pipeline/evaluation/answer_figures.py`):",
        "",
        *table(
            ["stage", "distinct answers %", "answers with a loop %", "ROUGE-L", "words (reference)"],
            [
                [
                    name,
                    f["distinct_pct"],
                    f["loops_pct"],
                    f["rouge_l"],
                    f"{f['words']} ({f['reference_words']})",
                ]
                for name, f in figures.items()
            ],
        ),
        "",
        f"The first {len(rows)} of {len(tuned[0].responses)} held-out items; each stage's folder has them all.",
        "",
        *table(["id", "instruction", "reference", *(s.name for s in tuned)], rows),
    ]


def expectations(stages: list[StageReport]) -> list[str]:
    """The box above the answers: what a model of this size and training can learn, and where to go for more."""
    pretrain = flatten(next((s.metrics for s in stages if s.name == "pretrain"), {}))
    params, tokens = pretrain.get("summary.trainable_params"), pretrain.get("train.tokens_seen")
    size = (
        f"a {params / 1e6:.1f}M-parameter GPT pretrained on {tokens / 1e6:.2f}M tokens"
        if isinstance(params, (int, float)) and isinstance(tokens, (int, float))
        else "this run's model"
    )
    return [
        f"> **What to expect.** These answers come from {size}, then tuned on about a thousand instructions. "
        "A model this small, trained for minutes, learns the form of an answer (the template, English word "
        "order, restating the question, stopping), not facts: expect answers that read as answers and are "
        "often wrong. For a model that answers, tune a larger pretrained base: the book's chapter 7 profile "
        "(GPT-2 medium, `params-book.yaml`), or a Llama-family base in its own chat template (SmolLM2-135M, "
        "`params-smollm2.yaml`; Qwen3-0.6B, `params-qwen3.yaml`); docs/training.md has both.",
    ]


def loss_figure(stages: list[StageReport], path: Path) -> bool:
    """Every stage's loss curves, one panel per stage; False when there are none."""
    with_curves = [s for s in stages if s.curves]
    if not with_curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(with_curves), figsize=(4.2 * len(with_curves), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], with_curves, strict=True):
        for name, points in sorted(stage.curves.items()):
            if points:
                ax.plot(*zip(*points, strict=True), label=name, marker="." if len(points) < 30 else None)
        ax.set_title(stage.name)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def score_table(metrics: dict) -> list[str]:
    """Harness scores (``{"models": {model: {task: {metric, metric_stderr, n, random_baseline}}}}``, as the
    benchmark stage writes them) as one row per task and metric, one column per model; [] for other metrics."""
    models = metrics.get("models")
    if (
        not isinstance(models, dict)
        or not models
        or not all(
            isinstance(tasks, dict)
            and all(isinstance(row, dict) and "random_baseline" in row for row in tasks.values())
            for tasks in models.values()
        )
    ):
        return []
    names = list(models)
    keys = dict.fromkeys(
        (task, metric)
        for tasks in models.values()
        for task, row in tasks.items()
        for metric in row
        if metric not in ("n", "random_baseline") and not metric.endswith("_stderr")
    )
    references = metrics.get("references") if isinstance(metrics.get("references"), dict) else {}
    rows = []
    for task, metric in keys:
        cells = [_score(models[name].get(task, {}), metric) for name in names]
        first = next((models[n][task] for n in names if task in models[n]), {})
        baseline = first.get("random_baseline") if metric.startswith("acc") else ""
        reference = references.get(task) or {}
        cited = _score(reference.get("metrics") or {}, metric)
        rows.append(
            [task, metric, *cells, "" if baseline is None else baseline, first.get("n", ""), cited]
            if references
            else [task, metric, *cells, "" if baseline is None else baseline, first.get("n", "")]
        )
    header = ["task", "metric", *names, "random guess", "items", *(["reference"] if references else [])]
    sources = [
        f"- reference for {task}: {ref.get('model')}, {ref.get('setting')}; source: {ref.get('source')}"
        for task, ref in references.items()
        if isinstance(ref, dict)
    ]
    return table(header, rows) + ([""] + sources if sources else [])


def _score(row: dict, metric: str) -> Any:
    """``value ± stderr`` of one metric, or the value alone; "" when the row has none."""
    value, err = row.get(metric), row.get(f"{metric}_stderr")
    if value is None:
        return ""
    return f"{value:.4g} ± {err:.2g}" if isinstance(err, float) else value


def stage_section(stage: StageReport, reports: Path) -> list[str]:
    lines = [f"## {stage.name}", ""]
    if scores := score_table(stage.metrics):
        lines += ["Scores ± standard error (lm-evaluation-harness):", "", *scores, ""]
    elif stage.metrics:
        lines += [*table(["metric", "value"], [[k, v] for k, v in flatten(stage.metrics).items()]), ""]
    for image in stage.images:
        lines += [f"![{stage.name}: {image.stem}]({image.relative_to(reports).as_posix()})", ""]
    if stage.samples:
        rows = [[s.get("prompt", ""), s.get("completion", "")] for s in stage.samples]
        lines += ["Samples:", "", *table(["prompt", "continuation"], rows), ""]
    if stage.responses:
        lines += [f"{len(stage.responses)} held-out answers in `{stage.directory.name}/responses.jsonl`.", ""]
    for path in stage.other:
        lines += [f"- `{path.relative_to(reports).as_posix()}` ({path.stat().st_size:,} bytes)"]
    if stage.other:
        lines.append("")
    if stage.markdown:
        own = IMAGE.sub(
            lambda m: f"![{m[1]}]({stage.name}/{m[2]})" if "://" not in m[2] else m[0], stage.markdown
        )
        own = re.sub(r"^(#+) ", lambda m: "#" * min(len(m[1]) + 2, 6) + " ", own, flags=re.M)
        lines += ["<details><summary>the stage's own report</summary>", "", own.strip(), "", "</details>", ""]
    return lines


def markdown(project: Path, stages: list[StageReport], curves: str | None) -> str:
    params_file = project / "params.yaml"
    params = read_yaml(params_file) if params_file.is_file() else {}
    git = git_state(project)
    lines = [
        "# Run report",
        "",
        # no path of the machine that made it: the page is committed and read elsewhere
        f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} at commit "
        f"`{git['commit'] or 'none'}`{' with uncommitted changes' if git['dirty'] else ''}; params sha256 "
        f"`{params_hash(params)[:16]}`.",
        "",
    ]
    for line in highlights(stages):
        lines += [line, ""]
    lines += ["## Stage times", "", *stage_times(stages), ""]
    if curves:
        lines += ["## Loss curves", "", f"![loss curves]({curves})", ""]
    lines += [*answers(stages), ""]
    for stage in stages:
        lines += stage_section(stage, project / "reports")
    versions = [[k, v or "not installed"] for k, v in package_versions().items()]
    lines += [
        "## Params and provenance",
        "",
        "```yaml",
        params_file.read_text(encoding="utf-8").strip() if params_file.is_file() else "# no params.yaml",
        "```",
        "",
        *table(["package", "version"], versions),
    ]
    return "\n".join(lines) + "\n"


def inline_images(text: str, base: Path) -> str:
    """Markdown with every local image turned into a data: URI (self-contained HTML, Prefect artifacts)."""

    def embed(match: re.Match) -> str:
        path = base / match[2]
        if "://" in match[2] or not path.is_file():
            return match[0]
        kind = {".svg": "svg+xml", ".jpg": "jpeg"}.get(path.suffix, path.suffix.lstrip("."))
        return f"![{match[1]}](data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode()})"

    return IMAGE.sub(embed, text)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1d2127; }}
table {{ border-collapse: collapse; margin: .5em 0; font-size: .9em; }}
th, td {{ border: 1px solid #d9dde3; padding: .25em .5em; text-align: left; vertical-align: top; }}
th {{ background: #f1f2f4; }} img {{ max-width: 100%; }} code, pre {{ background: #f6f7f9; }}
pre {{ padding: .6em; overflow-x: auto; }} blockquote {{ border-left: 4px solid #d97706; margin: .5em 0;
padding: .2em 1em; background: #fff7ed; }} details {{ margin: .5em 0 1.5em; }}
</style></head><body>
{body}
</body></html>
"""


def to_html(text: str, base: Path, title: str = "Run report") -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(inline_images(text, base))
    return PAGE.format(title=html.escape(title), body=body)


def write_report(
    project: Path, stage_order: list[str], html_path: Path, md_path: Path, assets: Path
) -> list[str]:
    """Render the run's report; returns the names of the stages it found."""
    reports = project / "reports"
    stages = collect(reports, stage_order)
    with atomic_path(assets) as tmp:
        tmp.mkdir()
        has_curves = loss_figure(stages, tmp / "loss_curves.png")
    text = markdown(
        project,
        stages,
        (assets / "loss_curves.png").relative_to(md_path.parent).as_posix() if has_curves else None,
    )
    with atomic_path(md_path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    with atomic_path(html_path) as tmp:
        tmp.write_text(to_html(text, md_path.parent), encoding="utf-8")
    return [s.name for s in stages]


# ---------------------------------------------------------------------------------------------- several runs


def run_label(reports: Path) -> str:
    return reports.resolve().parent.name or str(reports)


def compare_runs(runs: list[Path], out_dir: Path) -> tuple[str, list[Path]]:
    """Several runs' ``reports/`` folders side by side: params that differ, stage times, every metric, loss curves
    overlaid. Writes ``out_dir``/reports.md and the self-contained reports.html; returns (markdown, files)."""
    for reports in runs:
        if not reports.is_dir():
            raise PipelineError(
                f"{reports}: no such reports folder (run `dvc repro`, or give a run's reports/)"
            )
    labels = [run_label(r) for r in runs]
    if len(set(labels)) < len(labels):
        labels = [str(r) for r in runs]
    collected = [collect(r, []) for r in runs]
    names = list(dict.fromkeys(s.name for stages in collected for s in stages))
    by_run = [{s.name: s for s in stages} for stages in collected]
    lines = [
        "# Runs side by side",
        "",
        *(f"- **{label}**: `{r.resolve()}`" for label, r in zip(labels, runs, strict=True)),
        "",
    ]
    params = [
        flatten(read_yaml(r.parent / "params.yaml") or {}) if (r.parent / "params.yaml").is_file() else {}
        for r in runs
    ]
    differ = [
        k
        for k in dict.fromkeys(k for p in params for k in p)
        if len({json.dumps(p.get(k), default=str) for p in params}) > 1
    ]
    lines += [
        "## Params that differ",
        "",
        *(
            table(["param", *labels], [[k, *(p.get(k, "") for p in params)] for k in differ])
            if differ
            else ["None: the runs share their params."]
        ),
        "",
    ]
    times = [
        [n, *((run.get(n).timing or {}).get("seconds", "") if run.get(n) else "" for run in by_run)]
        for n in names
    ]
    lines += [
        "## Stage times (seconds)",
        "",
        *table(["stage", *labels], [t for t in times if any(t[1:])]),
        "",
    ]
    figure = out_dir / "reports_loss_curves.png"
    if overlay_figure([(label, run) for label, run in zip(labels, by_run, strict=True)], names, figure):
        lines += ["## Loss curves", "", f"![loss curves]({figure.name})", ""]
    for name in names:
        metrics = [flatten(run[name].metrics) if name in run else {} for run in by_run]
        keys = list(dict.fromkeys(k for m in metrics for k in m))
        if keys:
            lines += [
                f"## {name}",
                "",
                *table(["metric", *labels], [[k, *(m.get(k, "") for m in metrics)] for k in keys]),
                "",
            ]
    text = "\n".join(lines) + "\n"
    with atomic_path(out_dir / "reports.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    with atomic_path(out_dir / "reports.html") as tmp:
        tmp.write_text(to_html(text, out_dir, "Runs side by side"), encoding="utf-8")
    return text, [out_dir / "reports.md", out_dir / "reports.html", *([figure] if figure.is_file() else [])]


def overlay_figure(runs: list[tuple[str, dict[str, StageReport]]], names: list[str], path: Path) -> bool:
    """One panel per stage with loss curves; every run's curves overlaid. False (and no file) when there are none."""
    panels = [n for n in names if any(n in run and run[n].curves for _, run in runs)]
    path.unlink(missing_ok=True)
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        for label, run in runs:
            for curve, points in sorted(run[name].curves.items() if name in run else []):
                if points:
                    ax.plot(*zip(*points, strict=True), label=f"{label}: {curve}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return True
