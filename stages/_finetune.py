"""What the sft and dpo stages share: load the model and its tokenizer, train, then save, answer and record.

Output paths follow the stage's name: models/<stage>, checkpoints/<stage>, reports/<stage>/responses.jsonl.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.common.atomic import write_json
from pipeline.common.config import DPOParams, SFTParams
from pipeline.common.errors import PipelineError
from pipeline.common.hashing import sha256_file
from pipeline.common.provenance import provenance
from pipeline.data.instructions import Example, Loaded, check_recipe, load_examples, split_dataset
from pipeline.data.prompts import resolve
from pipeline.evaluation.answer_figures import answer_figures
from pipeline.evaluation.answers import generate_responses, sampling_options, write_responses
from pipeline.model.checkpoint import CONFIG, ModelAndTokenizer, load_with_tokenizer, save_trained
from pipeline.model.runtime import is_main
from pipeline.train import distributed
from pipeline.train.loop import TrainResult, train
from pipeline.train.objectives import data_fingerprint

TOKENIZER = Path("data/tokenizer")


def start(stage: str, p: SFTParams | DPOParams, model_dir: Path) -> ModelAndTokenizer:
    """Re-launch under torchrun when asked to, then load the model to tune with the data's tokenizer."""
    distributed.relaunch_under_torchrun(f"stages.{stage}", p)
    return load_with_tokenizer(model_dir, TOKENIZER)


def warn_skipped(loaded: Loaded) -> None:
    for line in loaded.skipped[:5]:
        print(f"warning: skipped {line}", file=sys.stderr)


def run(stage: str, model, objective, p: SFTParams | DPOParams, train_data, val_data) -> TrainResult:
    return train(
        model,
        objective,
        p,
        checkpoint_dir=Path("checkpoints") / stage,
        report_dir=Path("reports") / stage,
        desc=stage,
        data_fingerprint=data_fingerprint(train_data, val_data),
    )


def finish(
    stage: str,
    result: TrainResult,
    start: ModelAndTokenizer,
    p: SFTParams | DPOParams,
    recipe: dict,
    test_set: Sequence[Example],
    data: dict[str, int],
    sections: Sequence[str],
    base: Path,
) -> Path | None:
    """On the main worker: write models/<stage> (adapters merged, or as an adapter on ``base`` when
    ``lora.merge: false``), answer the held-out split, add the data counts to the metrics."""
    if not is_main():
        return None
    model = save_trained(
        Path("models") / stage,
        result.model,
        base,
        tokenizer={"path": str(TOKENIZER), "fingerprint": start.tokenizer_fingerprint},
        stage=stage,
        instructions=recipe,
        provenance=provenance(sections),
    )
    template = resolve(recipe["template"], start.tokenizer_meta, start.enc, "sft.template")
    opts = sampling_options(start.enc, p, template)
    responses = generate_responses(model, start.enc, test_set, template, opts, p.batch_size)
    out = Path("reports") / stage / "responses.jsonl"
    write_responses(out, responses.records)
    metrics_path = Path("reports") / stage / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    figures = answer_figures(responses.records)
    write_json(
        metrics_path, {**metrics, "answers": figures, "data": {**data, "prompts_cut": responses.prompts_cut}}
    )
    return out


def sft_recipe(model_dir: Path, meta: dict) -> dict:
    """How the SFT model was trained (data file, template, split), as the sft stage recorded it."""
    recipe = meta.get("instructions")
    if not isinstance(recipe, dict):
        raise PipelineError(
            f"{model_dir / CONFIG}: no 'instructions' record (was {model_dir} written by the sft stage?)"
        )
    check_recipe(recipe, f"{model_dir / CONFIG}: instructions")
    data = Path(recipe["data"])
    if not data.is_file() or sha256_file(data) != recipe["data_sha256"]:
        raise PipelineError(
            f"{data}: missing or changed since {model_dir} was trained (rerun it: dvc repro sft)"
        )
    return recipe


def held_out_examples(recipe: dict) -> list[Example]:
    """The SFT test split, rebuilt exactly (same ids, same order) from the recipe the sft stage recorded."""
    examples = load_examples(recipe["data"], recipe["strict"]).records
    return split_dataset(
        examples, recipe["split_train"], recipe["split_val"], recipe["split_seed"], recipe["data"]
    )[2]
