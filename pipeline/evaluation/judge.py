"""The LLM judge: a model served by Ollama scores each held-out answer against the reference answer.

Two scoring styles: ``score100``, the 0–100 prompt of the book's ch07 ``ollama_evaluate.py``, and ``rubric5``, a
1–5 rubric (less noisy: each level is described). ``pairwise`` asks which of two answers is better, in both orders,
so a judge that favours whichever answer it reads first cancels out.

Every answer is parsed as the first integer in range; an unreadable answer gets one retry with a stricter
instruction and is otherwise kept as *unparsed* (counted, never dropped). Every conversation with the judge is
cached on disk, keyed by (judge model, messages, options), so a rerun or a resumed run re-asks nothing.

When no judge answers, ``judge.on_unavailable`` decides: ``fail`` with a message naming the host and the fix, or
``fallback`` to ROUGE-L F1 against the reference (``pipeline.evaluation.rouge``), announced loudly and recorded as such.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
import pandas as pd
from tqdm import tqdm

from pipeline.common.atomic import write_json
from pipeline.common.config import ConfigError, JudgeParams
from pipeline.common.errors import PipelineError, one_line
from pipeline.common.json_files import read_jsonl
from pipeline.data.prompts import format_prompt
from pipeline.evaluation.rouge import rouge_l_f1

DEFAULT_HOST = "http://127.0.0.1:11434"
SCALES = {"score100": (0, 100), "rubric5": (1, 5)}
PAIR_SCALE = (0, 2)  # 0: equally good, 1: the first shown is better, 2: the second shown is better

SCORE100_PROMPT = (
    "Given the input `{prompt}` and correct output `{reference}`, score the model response `{response}` "
    "on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
)
RUBRIC5_PROMPT = (
    "You grade a model's response to an instruction against a reference answer.\n\n"
    "Instruction:\n{prompt}\n\nReference answer (a 5):\n{reference}\n\nModel response:\n{response}\n\n"
    "Rubric:\n"
    "1: wrong, irrelevant or empty.\n"
    "2: addresses the instruction only in part, with major errors.\n"
    "3: addresses the instruction, with some errors or omissions.\n"
    "4: correct, with minor flaws of wording or completeness.\n"
    "5: fully correct and complete, as good as the reference.\n\n"
    "Respond with the integer score (1-5) only."
)
PAIRWISE_PROMPT = (
    "Given the input `{prompt}` and correct output `{reference}`, compare two model responses.\n\n"
    "Response 1: `{response_1}`\n\nResponse 2: `{response_2}`\n\n"
    "Which response is better? Respond with 1 if Response 1 is better, 2 if Response 2 is better, "
    "or 0 if they are equally good. Respond with the integer number only."
)
STRICT_RETRY = "Your answer could not be read. Reply with one integer from {lo} to {hi} and nothing else."

SCORE_FIELDS = frozenset({"prompt", "instruction", "input", "reference", "response"})
PAIR_FIELDS = frozenset({"prompt", "instruction", "input", "reference", "response_1", "response_2"})

# An integer or decimal standing alone: not part of a word ("llama3") or of a longer number.
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w])")


class JudgeUnavailable(PipelineError):
    """No judge answered (nothing listening, timeouts, server errors) or the judge model is not pulled."""


@dataclass(frozen=True)
class Item:
    """A held-out instruction and its reference answer."""

    id: int
    instruction: str
    input: str
    reference: str


@dataclass(frozen=True)
class Judgment:
    """One verdict. ``value`` is None when the judge's answer could not be read even after the retry."""

    value: float | None
    status: str  # "scored" | "retried" (read after the stricter retry) | "unparsed" | "fallback"
    raw: str = ""  # what the judge said (both answers, joined by " | ", after a retry)


@dataclass(frozen=True)
class JudgeRun:
    """Per-item judgments (one row per item) and how they were made."""

    frame: pd.DataFrame
    scorer: dict
    requests: int  # HTTP requests sent to the judge in this run
    cache_hits: int


class Judge(Protocol):
    def score(self, item: Item, response: str) -> Judgment: ...
    def compare(self, item: Item, first: str, second: str) -> Judgment: ...


# ---------------------------------------------------------------------------------------------- parsing


def parse_score(text: str, lo: int, hi: int) -> int | None:
    """The first integer in [lo, hi] standing alone in ``text`` ("Score: 85/100" → 85); None if there is none.

    Decimals ("4.5") and numbers inside words ("llama3") are skipped, not rounded or split.
    """
    for match in _NUMBER.finditer(text):
        number = float(match.group())
        if number.is_integer() and lo <= number <= hi:
            return int(number)
    return None


# ---------------------------------------------------------------------------------------------- inputs


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for number, record in read_jsonl(path, "responses file", "has its stage run?"):
        for key, kind in (
            ("id", int),
            ("instruction", str),
            ("input", str),
            ("output", str),
            ("response", str),
        ):
            if not isinstance(record, dict) or not isinstance(record.get(key), kind):
                raise PipelineError(f"{path}:{number}: field '{key}' must be a {kind.__name__}")
        records.append(record)
    if not records:
        raise PipelineError(f"{path}: no responses")
    return records


def load_responses(paths: dict[str, Path]) -> tuple[list[Item], dict[str, list[str]]]:
    """The held-out items and each candidate's responses; every file must hold the same ids in the same order."""
    files = {name: _read_jsonl(Path(path)) for name, path in paths.items()}
    (first_name, first), *others = files.items()
    for name, records in others:
        if [r["id"] for r in records] != [r["id"] for r in first]:
            raise PipelineError(
                f"{paths[name]}: ids differ from {paths[first_name]} (same ids, same order expected)"
            )
    items = [Item(r["id"], r["instruction"], r["input"], r["output"]) for r in first]
    return items, {name: [r["response"] for r in records] for name, records in files.items()}


# ---------------------------------------------------------------------------------------------- prompts


def task_text(item: Item) -> str:
    """The instruction as the models saw it, without the answer header (the book's ``format_input``)."""
    return format_prompt(item.instruction, item.input).removesuffix("\n\n### Response:\n")


def check_template(template: str, fields: frozenset[str], required: set[str], param: str) -> str:
    """A prompt template whose placeholders are all known and include ``required``; else ConfigError."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"params.yaml: {param} is not a valid template ({exc})") from None
    if unknown := names - fields:
        known = ", ".join("{" + f + "}" for f in sorted(fields))
        raise ConfigError(
            f"params.yaml: {param} has unknown placeholder {{{sorted(unknown)[0]}}} (known: {known})"
        )
    if missing := required - names:
        raise ConfigError(f"params.yaml: {param} must contain {{{sorted(missing)[0]}}}")
    return template


class Prompts:
    """The score and pairwise prompts of one run (the style's defaults unless params give templates)."""

    def __init__(self, params: JudgeParams):
        default = SCORE100_PROMPT if params.style == "score100" else RUBRIC5_PROMPT
        self.score_template = check_template(
            params.prompt_template or default, SCORE_FIELDS, {"response"}, "judge.prompt_template"
        )
        self.pair_template = check_template(
            params.pairwise_template or PAIRWISE_PROMPT,
            PAIR_FIELDS,
            {"response_1", "response_2"},
            "judge.pairwise_template",
        )

    @staticmethod
    def _fields(item: Item) -> dict[str, str]:
        return {
            "prompt": task_text(item),
            "instruction": item.instruction,
            "input": item.input,
            "reference": item.reference,
        }

    def score(self, item: Item, response: str) -> str:
        return self.score_template.format(**self._fields(item), response=response)

    def pair(self, item: Item, first: str, second: str) -> str:
        return self.pair_template.format(**self._fields(item), response_1=first, response_2=second)


# ---------------------------------------------------------------------------------------------- cache


class JudgmentCache:
    """One JSON file per conversation with the judge, named by the hash of (model, messages, options).

    Files are written atomically as answers arrive, so a crash loses at most the answers in flight.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @staticmethod
    def key(model: str, messages: list[dict], options: dict) -> str:
        blob = json.dumps({"model": model, "messages": messages, "options": options}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))["answer"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def put(self, key: str, model: str, messages: list[dict], options: dict, answer: str) -> None:
        write_json(
            self._path(key), {"model": model, "options": options, "messages": messages, "answer": answer}
        )


# ---------------------------------------------------------------------------------------------- judges


def resolve_host(host: str | None) -> str:
    return host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST


class OllamaJudge:
    """Asks a judge model through the official ``ollama`` client, with cache, retries and the stricter retry."""

    def __init__(self, params: JudgeParams, cache: JudgmentCache, prompts: Prompts):
        self.params, self.cache, self.prompts = params, cache, prompts
        self.host = resolve_host(params.host)
        try:
            import ollama  # imported here: importing it builds a client from $OLLAMA_HOST, which may be bad

            self.client = ollama.Client(host=self.host, timeout=params.timeout_s)
            self._response_error = ollama.ResponseError
        except ValueError as exc:
            source = "judge.host" if params.host else "$OLLAMA_HOST"
            raise ConfigError(f"{source}: '{self.host}' is not a usable host ({exc})") from None
        self.options = {"temperature": params.temperature, "seed": params.seed, "num_ctx": params.num_ctx}
        self.requests = 0
        self.cache_hits = 0
        self._lock = threading.Lock()
        self._unavailable: JudgeUnavailable | None = None  # once set, queued work fails at once

    def score(self, item: Item, response: str) -> Judgment:
        return self.ask(self.prompts.score(item, response), *SCALES[self.params.style])

    def compare(self, item: Item, first: str, second: str) -> Judgment:
        return self.ask(self.prompts.pair(item, first, second), *PAIR_SCALE)

    def ask(self, prompt: str, lo: int, hi: int) -> Judgment:
        messages = [{"role": "user", "content": prompt}]
        answer = self._chat(messages)
        if (value := parse_score(answer, lo, hi)) is not None:
            return Judgment(value, "scored", answer)
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": STRICT_RETRY.format(lo=lo, hi=hi)},
        ]
        retry = self._chat(messages)
        value = parse_score(retry, lo, hi)
        return Judgment(value, "retried" if value is not None else "unparsed", f"{answer} | {retry}")

    def _chat(self, messages: list[dict]) -> str:
        key = self.cache.key(self.params.model, messages, self.options)
        if (cached := self.cache.get(key)) is not None:
            with self._lock:
                self.cache_hits += 1
            return cached
        answer = self._request(messages)
        self.cache.put(key, self.params.model, messages, self.options, answer)
        return answer

    def _request(self, messages: list[dict]) -> str:
        """One chat call; transient failures are retried with exponential backoff, then JudgeUnavailable."""
        params = self.params
        for attempt in range(params.retries + 1):
            with self._lock:
                if self._unavailable is not None:
                    raise self._unavailable
                self.requests += 1
            try:
                response = self.client.chat(model=params.model, messages=messages, options=self.options)
                return response.message.content or ""
            except self._response_error as exc:
                if exc.status_code == 404:
                    raise self._give_up(
                        f"judge model '{params.model}' is not pulled on {self.host} (the server said: "
                        f"{one_line(exc.error)}). Fix: run `ollama pull {params.model}`, or set judge.model "
                        "to a model that `ollama list` shows"
                    ) from None
                if 400 <= exc.status_code < 500 and exc.status_code != 429:
                    raise PipelineError(
                        f"judge: {self.host} refused the request for '{params.model}' "
                        f"(HTTP {exc.status_code}: {one_line(exc.error)})"
                    ) from None
                problem = f"HTTP {exc.status_code}: {one_line(exc.error)}"
            except ConnectionError:
                problem = "connection refused"
            except httpx.TimeoutException:
                problem = f"no answer within judge.timeout_s={params.timeout_s:g}s"
            except httpx.TransportError as exc:
                problem = one_line(f"{type(exc).__name__}: {exc}")
            if attempt < params.retries:
                time.sleep(params.backoff_s * 2**attempt)
        raise self._give_up(
            f"no Ollama judge answers at {self.host} ({problem}, {params.retries + 1} attempt(s)). "
            f"Fix: start it with `ollama serve`, then `ollama pull {params.model}`; "
            "or point judge.host / $OLLAMA_HOST at a running server"
        )

    def _give_up(self, message: str) -> JudgeUnavailable:
        with self._lock:
            self._unavailable = self._unavailable or JudgeUnavailable(message)
            return self._unavailable


class RougeFallbackJudge:
    """The deterministic stand-in: ROUGE-L F1 × 100 against the reference; pairs go to the higher ROUGE-L."""

    def score(self, item: Item, response: str) -> Judgment:
        return Judgment(round(100 * rouge_l_f1(item.reference, response), 2), "fallback")

    def compare(self, item: Item, first: str, second: str) -> Judgment:
        a, b = rouge_l_f1(item.reference, first), rouge_l_f1(item.reference, second)
        return Judgment(0 if a == b else 1 if a > b else 2, "fallback")


# ---------------------------------------------------------------------------------------------- running


def announce_fallback(reason: str) -> None:
    """The fallback must not pass unnoticed: a banner on stderr, whatever the log level."""
    bar = "!" * 100
    print(
        f"\n{bar}\nJUDGE FALLBACK: NO LLM JUDGED THESE ANSWERS.\n{one_line(reason)}\n"
        "Scores are ROUGE-L F1 x 100 against the reference answers (word overlap), recorded as scorer "
        "'rouge-l-fallback' in reports/judge/metrics.json and report.md.\n"
        f"Set judge.on_unavailable: fail to make this an error instead.\n{bar}\n",
        file=sys.stderr,
        flush=True,
    )


def pair_points(first_is_a: bool, value: float) -> float:
    """Points (1 win, 0.5 tie, 0 loss) for candidate B from a pairwise answer, whichever order it saw."""
    b_shown = 2 if first_is_a else 1
    return 0.5 if value == 0 else 1.0 if value == b_shown else 0.0


def _judge_all(
    judge: Judge, items: list[Item], candidates: dict[str, list[str]], pairwise: bool, concurrency: int
) -> pd.DataFrame:
    names = list(candidates)
    tasks: dict[tuple, Callable[[], Judgment]] = {}
    for i, item in enumerate(items):
        for name in names:
            tasks[("score", name, i)] = lambda item=item, r=candidates[name][i]: judge.score(item, r)
        if pairwise:
            a, b = (candidates[n][i] for n in names[:2])
            tasks[("pair", "a_first", i)] = lambda item=item, a=a, b=b: judge.compare(item, a, b)
            tasks[("pair", "b_first", i)] = lambda item=item, a=a, b=b: judge.compare(item, b, a)
    results: dict[tuple, Judgment] = {}
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(task): key for key, task in tasks.items()}
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="judge", unit="verdict"):
                results[futures[future]] = future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return _frame(items, candidates, results, pairwise)


def _frame(
    items: list[Item], candidates: dict[str, list[str]], results: dict[tuple, Judgment], pairwise: bool
) -> pd.DataFrame:
    names = list(candidates)
    rows = []
    for i, item in enumerate(items):
        row: dict = {
            "id": item.id,
            "instruction": item.instruction,
            "input": item.input,
            "reference": item.reference,
        }
        for name in names:
            verdict = results[("score", name, i)]
            row |= {
                f"{name}_response": candidates[name][i],
                f"{name}_score": verdict.value,
                f"{name}_status": verdict.status,
                f"{name}_raw": verdict.raw,
            }
        if pairwise:
            a, b = names[:2]
            points = []
            for order, first_is_a in (("a_first", True), ("b_first", False)):
                verdict = results[("pair", order, i)]
                label = f"pair_{a if first_is_a else b}_first"
                row |= {label: verdict.value, f"{label}_status": verdict.status, f"{label}_raw": verdict.raw}
                if verdict.value is not None:
                    points.append(pair_points(first_is_a, verdict.value))
            row[f"pair_points_{b}"] = sum(points) / 2 if len(points) == 2 else None
        rows.append(row)
    frame = pd.DataFrame(rows)
    numeric = [c for c in frame.columns if c.endswith(("_score", "_first")) or c.startswith("pair_points_")]
    return frame.astype({c: float for c in numeric})


def run_judge(
    params: JudgeParams, items: list[Item], candidates: dict[str, list[str]], cache_dir: str | Path
) -> JudgeRun:
    """Judge every candidate's response to every item (and the first two pairwise) with Ollama or the fallback."""
    if params.pairwise and len(candidates) < 2:
        raise ConfigError("params.yaml: judge.pairwise needs two candidates")
    prompts = Prompts(params)
    judge = OllamaJudge(params, JudgmentCache(cache_dir), prompts)
    lo, hi = SCALES[params.style]
    scorer = {
        "scorer": "ollama",
        "fallback": False,
        "fallback_reason": None,
        "model": params.model,
        "host": judge.host,
        "style": params.style,
        "scale_min": lo,
        "scale_max": hi,
        "temperature": params.temperature,
        "seed": params.seed,
        "num_ctx": params.num_ctx,
    }
    try:
        frame = _judge_all(judge, items, candidates, params.pairwise, params.concurrency)
    except JudgeUnavailable as exc:
        if params.on_unavailable == "fail":
            raise
        announce_fallback(str(exc))
        frame = _judge_all(RougeFallbackJudge(), items, candidates, params.pairwise, concurrency=1)
        scorer |= {
            "scorer": "rouge-l-fallback",
            "fallback": True,
            "fallback_reason": one_line(str(exc)),
            "style": "rouge_l_f1_x100",
            "scale_min": 0,
            "scale_max": 100,
        }
    return JudgeRun(frame, scorer, judge.requests, judge.cache_hits)
