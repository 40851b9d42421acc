"""The run report: stage wall times, the generic renderer, two runs side by side. The real `report` stage, at the
end of the whole tiny pipeline, is checked in tests/integration/test_pipeline_dag.py (which runs that pipeline once)."""

from __future__ import annotations

import json
import re
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from pipeline.cli import main as cli_main
from pipeline.common.errors import PipelineError
from pipeline.common.stage_timing import timed
from pipeline.orchestration.report import collect, write_report

STAGES = ["tokenize", "pretrain", "evaluate", "sft", "dpo", "judge"]


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")


def png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def fake_run(root: Path, loss: float = 5.0, lr: float = 0.001) -> Path:
    """What the stages leave under reports/, in their formats (plus a stage the renderer has never heard of)."""
    write(root / "params.yaml", f"pretrain:\n  lr: {lr}\n")
    reports = root / "reports"
    write(reports / "tokenize/metrics.json", {"tokens": {"train": 1000}, "bytes_per_token": 2.5})
    write(reports / "pretrain/metrics.json", {"train": {"loss": loss}, "val": {"loss": loss + 0.1}})
    write(
        reports / "pretrain/plots/metrics/train/loss.tsv", f"step\tloss\ttimestamp\n1\t6.0\t0\n2\t{loss}\t0\n"
    )
    write(reports / "pretrain/plots/metrics/train/lr.tsv", "step\tlr\n1\t0.001\n")
    write(reports / "evaluate/metrics.json", {"val_loss": loss + 0.1, "unigram_loss": 5.5})
    write(
        reports / "evaluate/samples.json",
        [{"prompt": "En un lugar", "completion": " de la Mancha", "tokens": 4}],
    )
    write(reports / "evaluate/report.md", "# Base model evaluation\n\n![loss curve](loss.png)\n")
    png(reports / "evaluate/loss.png")
    for stage, answer in (("sft", "Blue."), ("dpo", "Blue!")):
        write(
            reports / stage / "responses.jsonl",
            json.dumps(
                {"id": 3, "instruction": "Name a color.", "input": "", "output": "Red.", "response": answer}
            )
            + "\n",
        )
        write(reports / stage / "metrics.json", {"val": {"loss": 1.5}})
    write(
        reports / "judge/metrics.json",
        {
            "scorer": "rouge-l-fallback",
            "fallback": True,
            "fallback_reason": "no Ollama judge answers at http://127.0.0.1:9",
        },
    )
    write(reports / "distill/metrics.json", {"student": {"loss": 2.25}})  # a stage added later
    for n, stage in enumerate(STAGES):
        write(
            reports / stage / "timing.json",
            {"stage": stage, "seconds": n + 0.5, "finished_at": "2026-11-30T12:00:00"},
        )
    return reports


# ---------------------------------------------------------------------------------------------- timing


def stage_main(name: str, body: str):
    """A stage's ``main`` as `python -m stages.<name>` defines it (module ``__main__``, spec ``stages.<name>``)."""
    namespace = {
        "__spec__": ModuleSpec(f"stages.{name}", None),
        "__name__": "__main__",
        "PipelineError": PipelineError,
    }
    exec(f"def main():\n    {body}\n", namespace)
    return namespace["main"]


def test_timed_records_a_stage_wall_time_only_when_it_succeeds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert timed(stage_main("evaluate", "return 'done'"))() == "done"
    record = json.loads((tmp_path / "reports/evaluate/timing.json").read_text())
    assert (
        record["stage"] == "evaluate"
        and record["seconds"] >= 0
        and record["finished_at"] >= record["started_at"]
    )
    with pytest.raises(PipelineError):
        timed(stage_main("judge", "raise PipelineError('bad input')"))()
    assert not (tmp_path / "reports/judge").exists()
    timed(main_process=lambda: False)(
        stage_main("sft", "return 1")
    )()  # torchrun workers but rank 0 write nothing
    assert not (tmp_path / "reports/sft").exists()


# ---------------------------------------------------------------------------------------------- rendering


def test_report_renders_whatever_stage_folders_exist(tmp_path):
    reports = fake_run(tmp_path)
    found = write_report(tmp_path, STAGES, reports / "index.html", reports / "README.md", reports / "report")
    assert found == [*STAGES, "distill"]  # dvc.yaml order, then folders it does not know
    text = (reports / "README.md").read_text()
    assert "## distill" in text and "| student.loss | 2.25 |" in text
    assert "**Warning (judge): the fallback scorer rouge-l-fallback was used" in text
    assert "validation loss 5.1000 nats/token against the unigram baseline's 5.5000: 0.4000 below it" in text
    assert (
        "| 3 | Name a color. | Red. | Blue. | Blue! |" in text
    )  # reference beside each tuned model's answer
    assert "| En un lugar | de la Mancha |" in text
    assert "| sft | 100 | 0 | 0 | 1.0 (1.0) |" in text  # distinct %, loops %, ROUGE-L, words (reference's)
    assert "**What to expect.**" in text and "params-book.yaml" in text and "params-smollm2.yaml" in text
    assert str(tmp_path) not in text  # no path of the machine that made it
    assert "| pretrain | 1.5 |" in text and "| total | 18 |" in text  # stage times, summed
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):  # relative links that resolve from reports/
        assert (reports / image).is_file(), image
    assert "report/loss_curves.png" in text and "evaluate/loss.png" in text
    page = (reports / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and 'src="evaluate/' not in page  # self-contained
    assert "<table>" in page and "the stage's own report" in page


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("evaluate/metrics.json", "{", "reports/evaluate/metrics.json: not valid JSON"),
        (
            "sft/responses.jsonl",
            '{"id": 1}\n{oops\n',
            "reports/sft/responses.jsonl: line 2 is not valid JSON",
        ),
    ],
)
def test_a_corrupt_stage_file_is_one_error_line_and_no_page(
    tmp_path, monkeypatch, capsys, file, content, message
):
    reports = fake_run(tmp_path)
    write(reports / file, content)
    write(tmp_path / "dvc.yaml", "stages: {}\n")
    monkeypatch.chdir(tmp_path)
    from stages.report import main as report_stage

    with pytest.raises(SystemExit) as exited:
        report_stage()
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not (reports / "README.md").exists() and not (reports / "index.html").exists()


def test_two_runs_side_by_side(tmp_path, capsys):
    first, second = fake_run(tmp_path / "lr-low", 5.0, 0.001), fake_run(tmp_path / "lr-high", 4.0, 0.003)
    out = tmp_path / "here"
    assert cli_main(["compare", "--project", str(out), "--reports", str(first), str(second)]) == 0
    text = (out / "reports/compare/reports.md").read_text()
    assert "| pretrain.lr | 0.001 | 0.003 |" in text and "| train.loss | 5 | 4 |" in text
    assert "| pretrain | 1.5 | 1.5 |" in text and "## distill" in text
    assert (out / "reports/compare/reports_loss_curves.png").is_file()
    assert "data:image/png;base64," in (out / "reports/compare/reports.html").read_text()
    assert "written:" in capsys.readouterr().out


def test_compare_reports_bad_input(tmp_path, capsys):
    assert cli_main(["compare", "--reports", str(tmp_path)]) == 1
    assert "give two or more reports/ folders" in capsys.readouterr().err
    assert (
        cli_main(["compare", "--project", str(tmp_path), "--reports", str(tmp_path), str(tmp_path / "nope")])
        == 1
    )
    expected = (
        f"error: {tmp_path / 'nope'}: no such reports folder (run `dvc repro`, or give a run's reports/)"
    )
    assert capsys.readouterr().err.strip() == expected


def test_collect_skips_its_own_and_comparison_folders(tmp_path):
    reports = fake_run(tmp_path)
    write(reports / "report/timing.json", {"seconds": 1})
    write(reports / "compare/compare.csv", "a\n")
    assert [s.name for s in collect(reports, [])] == sorted([*STAGES, "distill"])
