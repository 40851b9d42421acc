"""benchmark stage: base, sft and dpo on the pipeline's lm-evaluation-harness tasks → reports/benchmark/metrics.json.

The cloze passages are the validation shards' text (decoded), the preference pairs the DPO stage's validation
pairs (rebuilt from its params); both become harness tasks in a scratch directory (evaluation/benchmark_tasks.py),
scored in process by evaluation/harness.py. Each model's score, stderr, items and the random-guess baseline.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from pipeline.common import config
from pipeline.common.atomic import write_json
from pipeline.common.errors import PipelineError, exit_on_error
from pipeline.common.stage_timing import timed
from pipeline.data.shards import ShardDataset
from pipeline.data.tokenizer import load_tokenizer
from pipeline.evaluation import benchmark_tasks as bt
from pipeline.evaluation.harness import run_tasks
from pipeline.model.checkpoint import read_model_config
from pipeline.model.runtime import local_device

MODELS = {"base": Path("models/base"), "sft": Path("models/sft"), "dpo": Path("models/dpo")}
TOKENIZER = Path("data/tokenizer")
SHARDS = Path("data/shards")
DPO_DATA = Path("data/raw/dpo.json")
OUT = Path("reports/benchmark/metrics.json")
PARAMS = ("benchmark", "dpo")
CLOZE_TOKENS = 400_000  # validation tokens decoded for passages: far more than any CPU-sized limit needs


def task_docs(p: config.DeclaredParams) -> dict[str, list[dict]]:
    b = p.benchmark
    docs = {}
    if bt.CLOZE in b.tasks:
        enc = load_tokenizer(TOKENIZER)
        val = ShardDataset(SHARDS, "val")
        ids = [int(t) for array in val.arrays for t in array[:CLOZE_TOKENS]][:CLOZE_TOKENS]
        texts = enc.decode(ids).split("<|endoftext|>")
        docs[bt.CLOZE] = bt.cloze_docs(texts, b.limit, b.seed)
    if bt.PREFERENCE in b.tasks:
        recipe = read_model_config(MODELS["sft"]).get("instructions") or {}
        pairs = bt.dpo_validation_pairs(DPO_DATA, p.dpo.strict, p.dpo.split_val, p.dpo.split_seed, recipe)
        docs[bt.PREFERENCE] = bt.preference_docs(pairs, b.limit)
    return docs


@exit_on_error
@timed
def main() -> None:
    p = config.load_params(sections=PARAMS)
    for directory in MODELS.values():  # a missing model fails now, not after the others are scored
        read_model_config(directory)
    for copy in p.benchmark.hub_copies:
        if not Path(copy.path).is_dir():
            raise PipelineError(
                f"benchmark.hub_copies: {copy.path} (the copy of {copy.repo}) is no directory"
            )
    docs = task_docs(p)
    with tempfile.TemporaryDirectory(prefix="benchmark-tasks-") as scratch:
        if set(p.benchmark.tasks) <= set(bt.TASKS) or p.benchmark.hub_copies:
            # local data: no cache outlives the stage (Hub downloads stay in the user's Hugging Face cache)
            os.environ["HF_DATASETS_CACHE"] = str(Path(scratch) / "datasets")
        for name, items in docs.items():
            bt.write_task(Path(scratch), name, items)
        scores = run_tasks(
            MODELS,
            scratch,
            list(p.benchmark.tasks),
            bt.RANDOM_BASELINE,
            limit=p.benchmark.limit,
            device=local_device("auto"),
            hub_copies={copy.repo: copy.path for copy in p.benchmark.hub_copies},
        )
    items = {task: row["n"] for task, row in next(iter(scores.values())).items()}
    references = bt.references(p.benchmark.tasks)
    write_json(OUT, {"tasks": items, "models": scores, "references": references})
    for line in bt.summary_lines(scores, references):
        print(f"benchmark: {line}", file=sys.stderr)
    print(f"benchmark: -> {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
