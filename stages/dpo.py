"""dpo stage: preference-tune models/sft on data/raw/dpo.json → models/dpo, held-out responses, reward curves.

The frozen reference is the SFT model itself; its log-probs are computed once per pair before training.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from pipeline.common import config
from pipeline.common.errors import exit_on_error
from pipeline.common.stage_timing import timed
from pipeline.data.instructions import load_preferences, split_dataset, tokenize_pairs
from pipeline.model import lora
from pipeline.model.runtime import autocast, is_main, local_device, resolve_dtype
from pipeline.train.objectives import DPOObjective, reference_logprobs, without_dropout
from stages import _finetune

PARAMS = ("dpo",)
DATA = Path("data/raw/dpo.json")
SFT_MODEL = Path("models/sft")


@exit_on_error
@timed(main_process=is_main)
def main() -> None:
    p = config.load_params(sections=PARAMS).dpo
    start = _finetune.start("dpo", p, SFT_MODEL)
    recipe = _finetune.sft_recipe(SFT_MODEL, start.meta)
    template, context = start.template, start.model.cfg.context_length  # SFT's, as models/sft records it
    test_set = _finetune.held_out_examples(recipe)
    held_out = {example.key for example in test_set}
    loaded = load_preferences(DATA, p.strict)
    _finetune.warn_skipped(loaded)
    usable = [pair for pair in loaded.records if pair.key not in held_out]
    train_pairs, val_pairs, _ = split_dataset(usable, 1 - p.split_val, p.split_val, p.split_seed, str(DATA))
    train_data = tokenize_pairs(start.enc, train_pairs, template, context)
    val_data = tokenize_pairs(start.enc, val_pairs, template, context)

    policy = lora.apply_lora(without_dropout(start.model), p.lora, "dpo.lora", p.seed)
    device = local_device(p.device)
    dtype = resolve_dtype(p.dtype, device, policy.cfg, 2 * p.batch_size * context)
    # With LoRA the reference is the policy with its adapters off (one copy of the model, as TRL does);
    # without, a frozen copy, only ever run under inference_mode.
    reference = policy.to(device) if lora.adapter_info(policy) else copy.deepcopy(policy).to(device)
    with lora.disabled(reference):
        cached = {
            name: reference_logprobs(
                reference,
                data,
                context_length=context,
                pad_id=start.enc.eot_token,
                reduction=p.reduction,
                batch_size=p.batch_size,
                autocast=lambda: autocast(device, dtype),
                desc=f"reference log-probs ({name})",
            )
            for name, data in (("train", train_data), ("val", val_data))
        }
    del reference
    objective = DPOObjective(
        train_data,
        val_data,
        cached["train"],
        cached["val"],
        beta=p.beta,
        reduction=p.reduction,
        batch_size=p.batch_size,
        grad_accum=p.grad_accum,
        eval_batches=p.eval_batches,
        context_length=context,
        pad_id=start.enc.eot_token,
        seed=p.seed,
    )
    result = _finetune.run("dpo", policy, objective, p, train_data, val_data)
    out = _finetune.finish(
        "dpo",
        result,
        start,
        p,
        recipe,
        test_set,
        {
            "records": len(loaded.records) + len(loaded.skipped),
            "skipped": len(loaded.skipped),
            "held_out_excluded": len(loaded.records) - len(usable),
            "train": len(train_data),
            "val": len(val_data),
            "test": len(test_set),
            "truncated": train_data.truncated + val_data.truncated,
            "dropped": train_data.dropped + val_data.dropped,
        },
        PARAMS,
        SFT_MODEL,
    )
    if out:
        m = result.metrics
        print(
            f"dpo: {m['step']} steps, train rewards/accuracies {m.get('train/rewards/accuracies', float('nan')):.2f}, "
            f"margins {m.get('train/rewards/margins', float('nan')):.3f}; {len(test_set)} held-out responses -> "
            f"{out}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
