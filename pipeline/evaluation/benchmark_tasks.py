"""The pipeline's own offline benchmarks, as lm-evaluation-harness tasks: task YAML in the harness's format over
local JSONL, built from data the pipeline already holds.

- ``pipeline_cloze``: LAMBADA-style: a held-out passage without its last word; the model should give that word
  (scored as LAMBADA scores it: ``acc`` when greedy decoding yields the whole word, and ``perplexity``).
- ``pipeline_preference``: a held-out DPO prompt with its chosen and rejected answers; ``acc`` when the chosen
  one has the higher log-likelihood (``acc_norm`` per byte, as the harness normalises).

Beside them, the published scores of reference models on the harness's own tasks
(``benchmark_references.json``, each with its source), printed beside ours.

It knows documents, where the pipeline keeps them, and task files: no model, no scoring, no report.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

from pipeline.common.errors import PipelineError
from pipeline.data.instructions import check_recipe, load_examples, load_preferences, split_dataset

CLOZE, PREFERENCE = "pipeline_cloze", "pipeline_preference"
TASKS = (CLOZE, PREFERENCE)
# What guessing scores: a random word is (almost) never the passage's last; a coin picks the chosen half the time.
RANDOM_BASELINE = {CLOZE: 0.0, PREFERENCE: 0.5}
MIN_CONTEXT_WORDS = 8  # a cloze needs some passage to predict from
REFERENCES = Path(__file__).with_name("benchmark_references.json")

CLOZE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

PREFERENCE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}\\n"
doc_to_choice: "{{{{[chosen, rejected]}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def cloze_docs(texts: Iterable[str], limit: int, seed: int = 0, max_chars: int = 400) -> list[dict]:
    """Up to ``limit`` (context, target) items: each paragraph's tail of at most ``max_chars`` characters, cut
    before its last word (trailing punctuation dropped from the target, as LAMBADA's words carry none)."""
    docs = []
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text):
            passage = " ".join(paragraph.split())  # hard-wrapped lines (Gutenberg's) join into one passage
            words = passage[-max_chars:].split()[1:]  # the first may be cut mid-word
            if len(words) <= MIN_CONTEXT_WORDS:
                continue
            target = words[-1].strip(".,;:!?¡¿\"'()«»—-")
            if target.isalpha():
                docs.append({"context": " ".join(words[:-1]), "target": target})
    random.Random(seed).shuffle(docs)
    return docs[:limit]


def preference_docs(pairs: Iterable[tuple[str, str, str]], limit: int) -> list[dict]:
    """Up to ``limit`` (prompt, chosen, rejected) items, in the order given."""
    docs = [
        {"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs if c.strip() and r.strip() and c != r
    ]
    return docs[:limit]


def dpo_validation_pairs(
    data: str | Path, strict: bool, split_val: float, split_seed: int, sft_recipe: dict
) -> list[tuple[str, str, str]]:
    """The DPO stage's validation pairs, rebuilt as it builds them: pairs whose prompt is in the SFT test split
    (``sft_recipe``, as models/sft records it) left out, then the same seeded split. (prompt, chosen, rejected),
    the prompt plain text: the instruction, then its input after a blank line."""
    check_recipe(sft_recipe, "models/sft/config.json: instructions")
    examples = load_examples(sft_recipe["data"], sft_recipe["strict"]).records
    test = split_dataset(
        examples,
        sft_recipe["split_train"],
        sft_recipe["split_val"],
        sft_recipe["split_seed"],
        sft_recipe["data"],
    )[2]
    held_out = {example.key for example in test}
    usable = [pair for pair in load_preferences(data, strict).records if pair.key not in held_out]
    if not usable:
        raise PipelineError(f"{data}: no preference pair outside the SFT test split to benchmark with")
    val = split_dataset(usable, 1 - split_val, split_val, split_seed, str(data))[1]
    return [
        ("\n\n".join(t for t in (pair.instruction, pair.input) if t), pair.chosen, pair.rejected)
        for pair in val
    ]


def write_task(directory: Path, name: str, docs: list[dict]) -> None:
    """``directory/name.jsonl`` and ``directory/name.yaml``: a task the harness finds with ``include_path``."""
    if name not in TASKS:
        raise ValueError(f"unknown pipeline task {name!r} (known: {', '.join(TASKS)})")
    directory.mkdir(parents=True, exist_ok=True)
    data = (directory / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    template = CLOZE_YAML if name == CLOZE else PREFERENCE_YAML
    (directory / f"{name}.yaml").write_text(
        template.format(name=name, data=json.dumps(str(data))), encoding="utf-8"
    )


def references(tasks: Iterable[str]) -> dict[str, dict]:
    """The published reference rows of ``tasks`` (model, metrics, setting, source), for those that have one."""
    known = json.loads(REFERENCES.read_text(encoding="utf-8"))
    return {task: known[task] for task in tasks if task in known}


def summary_lines(scores: dict[str, dict[str, dict]], refs: dict[str, dict]) -> list[str]:
    """One line per task: each model's headline metric (acc, else the first), then the reference's."""
    lines = []
    for task in next(iter(scores.values()), {}):
        rows = {model: tasks[task] for model, tasks in scores.items()}
        first = next(iter(rows.values()))
        metric = "acc" if "acc" in first else next(k for k in first if k not in ("n", "random_baseline"))
        ours = ", ".join(f"{model} {row.get(metric, float('nan')):.3f}" for model, row in rows.items())
        line = f"{task} {metric} ({first['n']} items): {ours}"
        if first.get("random_baseline") is not None:
            line += f"; random guess {first['random_baseline']:.3f}"
        if (ref := refs.get(task)) and metric in ref["metrics"]:
            line += f"; reference {ref['model']} {ref['metrics'][metric]:.3f} ({ref['source']})"
        lines.append(line)
    return lines
