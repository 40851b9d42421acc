"""pretrain stage: data/shards + data/tokenizer → models/base, checkpoints/pretrain (resumable), reports/pretrain."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.common import config
from pipeline.common.errors import exit_on_error
from pipeline.common.provenance import provenance
from pipeline.common.stage_timing import timed
from pipeline.data.instructions import load_examples, split_dataset
from pipeline.model.checkpoint import save_model
from pipeline.model.runtime import is_main
from pipeline.train import distributed
from pipeline.train.loop import train
from pipeline.train.pretrain_setup import prepare

TOKENIZER = Path("data/tokenizer")
SHARDS = Path("data/shards")
OUT = Path("models/base")
CHECKPOINTS = Path("checkpoints/pretrain")
REPORTS = Path("reports/pretrain")
SFT_DATA = Path("data/raw/sft.json")
# the sft keys: mid-training reads the SFT training split, with the split and template the sft stage uses
PARAMS = (
    "seed",
    "model",
    "pretrain",
    "sft.template",
    "sft.strict",
    "sft.split_train",
    "sft.split_val",
    "sft.split_seed",
)


@exit_on_error
@timed(main_process=is_main)
def main() -> None:
    params = config.load_params(sections=PARAMS)
    p = params.pretrain
    distributed.relaunch_under_torchrun("stages.pretrain", p)
    sft = params.sft
    mid = []
    if p.mid_steps:
        examples = load_examples(SFT_DATA, sft.strict).records
        mid = split_dataset(examples, sft.split_train, sft.split_val, sft.split_seed, str(SFT_DATA))[0]
    setup = prepare(params.model, p, params.seed, TOKENIZER, SHARDS, mid=mid, template=sft.template)
    result = train(
        setup.model,
        setup.objective,
        setup.params,
        checkpoint_dir=CHECKPOINTS,
        report_dir=REPORTS,
        desc="pretrain",
        data_fingerprint=setup.objective.fingerprint,
    )
    if not is_main():
        return
    training = {
        "steps": result.metrics["step"],
        "context_length": setup.objective.context_length,
        "val_loss": result.metrics.get("val/loss"),
    }
    if mid:
        training["mid_training"] = (
            f"{SFT_DATA}: the {len(mid)} examples of its training split ({sft.template} template), "
            f"last {p.mid_steps} steps"
        )
    start = {"init_from": setup.init} if setup.init else {}
    CHECKPOINTS.mkdir(
        parents=True, exist_ok=True
    )  # a declared DVC output, even when max_steps: 0 saved no checkpoint
    save_model(
        OUT,
        result.model,
        tokenizer={"path": str(TOKENIZER), "fingerprint": setup.tokenizer_fingerprint},
        stage="pretrain",
        training=training,
        provenance=provenance(("seed", "model", "pretrain", *(("sft",) if mid else ()))),  # whole sections
        **start,
    )
    print(
        f"pretrain: {result.metrics['step']} steps, val loss {result.metrics.get('val/loss', float('nan')):.4f}"
        f" -> {OUT}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
