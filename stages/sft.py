"""sft stage: instruction-tune models/base on data/raw/sft.json → models/sft, held-out responses, loss curves."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.common import config
from pipeline.common.errors import exit_on_error
from pipeline.common.hashing import sha256_file
from pipeline.common.stage_timing import timed
from pipeline.data.chat_template import ChatTemplate
from pipeline.data.instructions import load_examples, split_dataset, tokenize_examples
from pipeline.data.prompts import resolve
from pipeline.model import lora
from pipeline.model.runtime import is_main
from pipeline.train.objectives import SFTObjective
from stages import _finetune

PARAMS = ("sft",)
DATA = Path("data/raw/sft.json")
BASE = Path("models/base")


@exit_on_error
@timed(main_process=is_main)
def main() -> None:
    p = config.load_params(sections=PARAMS).sft
    start = _finetune.start("sft", p, BASE)
    context = start.model.cfg.context_length
    loaded = load_examples(DATA, p.strict)
    _finetune.warn_skipped(loaded)
    train_set, val_set, test_set = split_dataset(
        loaded.records, p.split_train, p.split_val, p.split_seed, str(DATA)
    )
    template = resolve(p.template, start.tokenizer_meta, start.enc, "sft.template")
    train_data = tokenize_examples(start.enc, train_set, template, context)
    val_data = tokenize_examples(start.enc, val_set, template, context)
    objective = SFTObjective(
        train_data,
        val_data,
        batch_size=p.batch_size,
        grad_accum=p.grad_accum,
        eval_batches=p.eval_batches,
        context_length=context,
        pad_id=start.enc.eot_token,
        mask_prompt=p.mask_prompt,
        seed=p.seed,
    )
    result = _finetune.run(
        "sft", lora.apply_lora(start.model, p.lora, "sft.lora", p.seed), objective, p, train_data, val_data
    )
    recipe = {
        "data": str(DATA),
        "data_sha256": sha256_file(DATA),
        "template": p.template,
        **(template.record() if isinstance(template, ChatTemplate) else {}),
        "strict": p.strict,
        "split_train": p.split_train,
        "split_val": p.split_val,
        "split_seed": p.split_seed,
    }
    out = _finetune.finish(
        "sft",
        result,
        start,
        p,
        recipe,
        test_set,
        {
            "records": len(loaded.records) + len(loaded.skipped),
            "skipped": len(loaded.skipped),
            "train": len(train_data),
            "val": len(val_data),
            "test": len(test_set),
            "truncated": train_data.truncated + val_data.truncated,
            "dropped": train_data.dropped + val_data.dropped,
        },
        PARAMS,
        BASE,
    )
    if out:
        print(
            f"sft: {result.metrics['step']} steps, val loss {result.metrics.get('val/loss', float('nan')):.4f}; "
            f"{len(test_set)} held-out responses -> {out}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
