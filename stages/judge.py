"""judge stage: score the SFT and DPO held-out responses with an Ollama judge (or the loud ROUGE-L fallback)."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.common import config
from pipeline.common.errors import exit_on_error
from pipeline.common.stage_timing import timed
from pipeline.evaluation.judge import load_responses, run_judge
from pipeline.evaluation.judge_report import summarize, write_outputs

RESPONSES = {"sft": "reports/sft/responses.jsonl", "dpo": "reports/dpo/responses.jsonl"}
CACHE_DIR = "cache/judge"
REPORT_DIR = "reports/judge"
PARAMS = ("judge",)


@exit_on_error
@timed
def main() -> None:
    params = config.load_params(sections=PARAMS).judge
    items, candidates = load_responses(RESPONSES)
    Path(CACHE_DIR).mkdir(parents=True, exist_ok=True)  # a DVC output even when nothing gets cached
    run = run_judge(params, items, candidates, CACHE_DIR)
    names = list(candidates)
    metrics = summarize(run.frame, run.scorer, names, params.pairwise, params.bootstrap_samples, params.seed)
    write_outputs(run.frame, metrics, names, REPORT_DIR)
    means = ", ".join(f"{n} {metrics['scores'][n]['mean']}" for n in names)
    print(
        f"judge: {metrics['scorer']} scored {len(items)} items ({means}); {run.requests} requests, "
        f"{run.cache_hits} cached answers, {metrics['unparsed_total']} unparsed -> {REPORT_DIR}/",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
