"""The judge over real HTTP: the official ollama client against our own Ollama-API server on 127.0.0.1.

The judge model is a tiny char-level GPT trained here, in seconds, to answer the very prompts the judge sends:
"90" for a good answer (the scored path), "none" twice for a bad one (the unparsed path), "Good." and then "4"
after the stricter retry (the retry path), and "1" to every pairwise question (a pure position bias).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.common.config import ConfigError, JudgeParams
from pipeline.common.errors import PipelineError
from pipeline.data.prompts import chat_prompt_ids, encode_response
from pipeline.data.tokenizer import train_char
from pipeline.evaluation.judge import (
    STRICT_RETRY,
    Item,
    JudgeUnavailable,
    Prompts,
    load_responses,
    parse_score,
    run_judge,
)
from pipeline.evaluation.judge_report import bootstrap_mean, summarize, write_outputs
from pipeline.evaluation.rouge import rouge_l_f1
from pipeline.serve.served_model import fit_prompt
from tests.helpers.project import make_project
from tests.helpers.serving import free_port, load_served, running_server, save_tiny_model

CONTEXT = 64
ITEMS = [
    Item(i, f"What is {i} plus {i}?", "" if i % 2 else "Answer briefly.", f"It is {2 * i}.") for i in range(6)
]
SFT = [f"It is {2 * i}." for i in range(6)]
DPO = [f"No idea, {i}." for i in range(6)]
# Puts the response last, where the tiny judge (which sees only the prompt's tail) can read it.
RESPONSE_LAST = "Reference: {reference}. Grade 0-100 the response: {response}"


def judge_examples() -> list[tuple[list[int], list[int]]]:
    """(prompt ids as our server renders and truncates them, answer ids) for every question the tests ask."""
    enc = train_char([], 256 + 16)
    score100 = Prompts(JudgeParams(style="score100", prompt_template=RESPONSE_LAST))
    rubric5 = Prompts(JudgeParams(style="rubric5"))
    examples = []

    def answer(messages: list[tuple[str, str]], text: str) -> None:
        prompt = fit_prompt(chat_prompt_ids(enc, "alpaca", messages), CONTEXT, None)[0]
        examples.append((prompt, encode_response(enc, text, "alpaca")))

    def retried(prompt: str, first: str, lo: int, hi: int) -> list[tuple[str, str]]:
        return [("user", prompt), ("assistant", first), ("user", STRICT_RETRY.format(lo=lo, hi=hi))]

    for item, good, bad in zip(ITEMS, SFT, DPO, strict=False):
        answer([("user", score100.score(item, good))], "90")
        answer([("user", score100.score(item, bad))], "none")
        answer(retried(score100.score(item, bad), "none", 0, 100), "none")
        for response in (good, bad):
            answer([("user", rubric5.score(item, response))], "Good.")
            answer(retried(rubric5.score(item, response), "Good.", 1, 5), "4")
        answer([("user", rubric5.pair(item, good, bad))], "1")
        answer([("user", rubric5.pair(item, bad, good))], "1")
    return examples


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    """Our server on a free 127.0.0.1 port, serving the trained tiny judge as "judge"; yields (url, app)."""
    directory = tmp_path_factory.mktemp("judge-model") / "judge"
    save_tiny_model(directory, "alpaca", CONTEXT, seed=0, examples=judge_examples(), steps=120)
    with running_server(load_served({"judge": directory})) as server:
        yield server


def write_responses(root: Path, items=ITEMS, sft=SFT, dpo=DPO) -> dict[str, Path]:
    """The SFT and DPO stages' held-out responses, in the contract's JSONL format."""
    paths = {}
    for name, responses in (("sft", sft), ("dpo", dpo)):
        path = root / "reports" / name / "responses.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps(
                {
                    "id": it.id,
                    "instruction": it.instruction,
                    "input": it.input,
                    "output": it.reference,
                    "response": r,
                }
            )
            for it, r in zip(items, responses, strict=False)
        ]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[name] = path
    return paths


def chats(app) -> int:
    return app.state.requests["/api/chat"]


# ---------------------------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("text", "lo", "hi", "expected"),
    [
        ("85", 0, 100, 85),
        ("Score: 85/100", 0, 100, 85),
        ("**4**", 1, 5, 4),
        ("I would rate it 4.5, so 4", 1, 5, 4),  # a decimal is skipped, not rounded
        ("llama3 gives 70", 0, 100, 70),  # digits inside a word are not a number
        ("150, no: 95", 0, 100, 95),  # out of range: the next one
        ("-3", 0, 100, None),
        ("0", 0, 2, 0),
        ("85.0", 0, 100, 85),
        ("Good.", 1, 5, None),
        ("", 0, 100, None),
        ("6 out of 5", 1, 5, 5),
    ],
)
def test_parse_score_takes_the_first_integer_in_range(text, lo, hi, expected):
    assert parse_score(text, lo, hi) == expected


def test_rouge_l_f1():
    assert rouge_l_f1("The cat sat on the mat.", "the cat sat on the mat") == 1.0
    assert rouge_l_f1("a b c", "x y z") == 0.0
    assert rouge_l_f1("a b", "") == 0.0
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/5, R = 5/6.
    assert rouge_l_f1("the cat sat on the mat", "the cat on the mat") == pytest.approx(
        2 * 1 * (5 / 6) / (1 + 5 / 6)
    )


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = np.arange(20.0)
    first, again = bootstrap_mean(values, 500, seed=3), bootstrap_mean(values, 500, seed=3)
    assert first == again
    mean, low, high = first
    assert mean == 9.5 and low < mean < high
    assert bootstrap_mean(np.array([]), 500, seed=3) == (None, None, None)


def test_templates_are_validated_with_the_param_named():
    with pytest.raises(ConfigError, match=r"judge.prompt_template has unknown placeholder \{answer\}"):
        Prompts(JudgeParams(prompt_template="Grade {answer}"))
    with pytest.raises(ConfigError, match=r"judge.prompt_template must contain \{response\}"):
        Prompts(JudgeParams(prompt_template="Grade {reference}"))
    with pytest.raises(ConfigError, match="judge.pairwise_template"):
        Prompts(JudgeParams(pairwise_template="{response_1} only"))
    book = Prompts(JudgeParams()).score(ITEMS[0], "It is 0.")
    assert book.startswith("Given the input `Below is an instruction") and "### Response" not in book
    assert book.endswith(
        "score the model response `It is 0.` on a scale from 0 to 100, where 100 is the best "
        "score. Respond with the integer number only."
    )


def test_responses_files_are_checked(tmp_path):
    paths = write_responses(tmp_path)
    items, candidates = load_responses(paths)
    assert [i.id for i in items] == list(range(6)) and candidates["dpo"] == DPO
    lines = paths["dpo"].read_text().splitlines()
    paths["dpo"].write_text("\n".join(lines[::-1]) + "\n")
    with pytest.raises(PipelineError, match="dpo/responses.jsonl: ids differ"):
        load_responses(paths)
    paths["dpo"].write_text('{"id": 0, "instruction": "x"}\n')
    with pytest.raises(PipelineError, match=r"dpo/responses.jsonl:1: field 'input' must be a str"):
        load_responses(paths)


# ---------------------------------------------------------------------------------------------- over real HTTP


def judge_params(url: str, **overrides) -> JudgeParams:
    base = {
        "host": url,
        "model": "judge",
        "style": "score100",
        "prompt_template": RESPONSE_LAST,
        "retries": 1,
        "backoff_s": 0.0,
        "timeout_s": 60.0,
        "bootstrap_samples": 200,
    }
    return JudgeParams(**{**base, **overrides})


def test_scored_and_unparsed_paths_then_a_cached_rerun_sends_nothing(judge_server, tmp_path):
    url, app = judge_server
    params = judge_params(url)
    cache = tmp_path / "cache"
    before = chats(app)
    first = run_judge(params, ITEMS, {"sft": SFT, "dpo": DPO}, cache)
    sent = chats(app) - before
    frame = first.frame
    assert first.scorer["scorer"] == "ollama" and not first.scorer["fallback"]
    assert frame["sft_score"].tolist() == [90.0] * 6 and set(frame["sft_status"]) == {"scored"}
    # Unreadable twice: kept as unparsed, with both answers, never dropped.
    assert frame["dpo_score"].isna().all() and set(frame["dpo_status"]) == {"unparsed"}
    assert set(frame["dpo_raw"]) == {"none | none"}
    # A judge that always says "1" prefers whichever answer it reads first: the two orders cancel it out.
    assert frame["pair_points_dpo"].tolist() == [0.5] * 6
    # 12 scores + 6 stricter retries + 12 pairwise questions, each one HTTP request counted at the server.
    assert sent == first.requests == 30 and first.cache_hits == 0

    metrics = summarize(frame, first.scorer, ["sft", "dpo"], True, 200, seed=1)
    assert metrics["scores"]["sft"] == {
        "mean": 90.0,
        "ci95_low": 90.0,
        "ci95_high": 90.0,
        "scored": 6,
        "retried": 0,
        "unparsed": 0,
    }
    assert metrics["scores"]["dpo"]["unparsed"] == 6 and metrics["scores"]["dpo"]["mean"] is None
    pair = metrics["pairwise"]
    assert (
        pair["dpo_win_rate"] == 0.5 and pair["consistent_rate"] == 0.0 and pair["first_position_rate"] == 1.0
    )
    assert metrics["unparsed_total"] == 6

    before = chats(app)
    again = run_judge(params, ITEMS, {"sft": SFT, "dpo": DPO}, cache)
    assert chats(app) - before == 0 and again.requests == 0 and again.cache_hits == 30
    pd.testing.assert_frame_equal(again.frame, frame)


def test_rubric_answer_read_after_the_stricter_retry(judge_server, tmp_path):
    url, app = judge_server
    run = run_judge(
        judge_params(url, style="rubric5", prompt_template=None, pairwise=False),
        ITEMS[:3],
        {"sft": SFT[:3], "dpo": DPO[:3]},
        tmp_path / "cache",
    )
    assert run.frame["sft_score"].tolist() == [4.0] * 3 and set(run.frame["dpo_status"]) == {"retried"}
    assert set(run.frame["sft_raw"]) == {"Good. | 4"}
    assert run.requests == 12  # 6 questions, each retried once
    write_outputs(
        run.frame,
        summarize(run.frame, run.scorer, ["sft", "dpo"], False, 200, 1),
        ["sft", "dpo"],
        tmp_path / "report",
    )
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Judge: `judge`" in report and "| sft | 4.00 |" in report and "FALLBACK" not in report
    assert (tmp_path / "report" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert len(pd.read_csv(tmp_path / "report" / "items.csv")) == 3


def test_model_not_pulled_gets_its_own_message(judge_server, tmp_path, capfd):
    url, app = judge_server
    params = judge_params(url, model="llama3.1:8b", on_unavailable="fail")
    before = chats(app)
    with pytest.raises(JudgeUnavailable) as error:
        run_judge(params, ITEMS, {"sft": SFT, "dpo": DPO}, tmp_path / "cache")
    message = str(error.value)
    assert f"judge model 'llama3.1:8b' is not pulled on {url}" in message
    assert "`ollama pull llama3.1:8b`" in message and "try pulling it first" in message
    assert chats(app) - before <= 2  # a 404 is not retried, and stops the other workers

    fallback = run_judge(
        judge_params(url, model="llama3.1:8b"), ITEMS, {"sft": SFT, "dpo": DPO}, tmp_path / "cache"
    )
    assert (
        fallback.scorer["scorer"] == "rouge-l-fallback" and "not pulled" in fallback.scorer["fallback_reason"]
    )
    assert "JUDGE FALLBACK: NO LLM JUDGED THESE ANSWERS" in capfd.readouterr().err


def test_server_down_fails_clearly_or_falls_back_loudly(tmp_path, capfd):
    host = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(JudgeUnavailable) as error:
        run_judge(
            judge_params(host, on_unavailable="fail"), ITEMS, {"sft": SFT, "dpo": DPO}, tmp_path / "cache"
        )
    message = str(error.value)
    assert f"no Ollama judge answers at {host}" in message
    assert "`ollama serve`" in message and "`ollama pull judge`" in message

    run = run_judge(judge_params(host), ITEMS, {"sft": SFT, "dpo": DPO}, tmp_path / "cache")
    assert run.scorer["fallback"] and run.scorer["scorer"] == "rouge-l-fallback"
    assert run.frame["sft_score"].tolist() == [100.0] * 6  # the SFT answers are the references
    assert set(run.frame["dpo_status"]) == {"fallback"} and run.frame["pair_points_dpo"].tolist() == [0.0] * 6
    err = capfd.readouterr().err
    assert "JUDGE FALLBACK" in err and host in err
    metrics = summarize(run.frame, run.scorer, ["sft", "dpo"], True, 200, 1)
    write_outputs(run.frame, metrics, ["sft", "dpo"], tmp_path / "report")
    assert "FALLBACK SCORER: NO LLM JUDGED THESE ANSWERS" in (tmp_path / "report" / "report.md").read_text()
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["scorer"] == "rouge-l-fallback"


# ---------------------------------------------------------------------------------------------- the DVC stage


def dvc_repro(project: Path, *flags: str) -> subprocess.CompletedProcess:
    """`dvc repro --single-item judge` with this interpreter's environment first on PATH (the stage runs `python`)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "--single-item", *flags, "judge"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_dvc_repro_judge_offline_then_against_our_server(judge_server, tmp_path):
    url, app = judge_server
    project = make_project(tmp_path / "project")
    write_responses(project)
    offline = dvc_repro(project)
    assert offline.returncode == 0, offline.stderr
    assert "JUDGE FALLBACK" in offline.stderr
    metrics = json.loads((project / "reports/judge/metrics.json").read_text())
    assert metrics["scorer"] == "rouge-l-fallback" and metrics["items"] == 6
    assert (project / "reports/judge/items.csv").is_file() and (
        project / "reports/judge/scores.png"
    ).is_file()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["judge"] |= {
        "host": url,
        "model": "judge",
        "prompt_template": RESPONSE_LAST,
        "on_unavailable": "fail",
        "timeout_s": 60,
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = chats(app)
    judged = dvc_repro(project)
    assert judged.returncode == 0, judged.stderr
    assert chats(app) - before == 30 and "JUDGE FALLBACK" not in judged.stderr
    metrics = json.loads((project / "reports/judge/metrics.json").read_text())
    assert metrics["scorer"] == "ollama" and metrics["scores"]["sft"]["mean"] == 90.0
    assert metrics["scores"]["dpo"]["unparsed"] == 6

    before = chats(app)
    rerun = dvc_repro(project, "--force")
    assert rerun.returncode == 0, rerun.stderr
    assert chats(app) - before == 0 and "0 requests, 30 cached answers" in rerun.stderr
