"""classify stage: models/<classify.model> + labelled texts → models/classifier, reports/classify (scores, plots)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from pipeline.common import config
from pipeline.common.atomic import write_json
from pipeline.common.errors import exit_on_error
from pipeline.common.provenance import provenance
from pipeline.common.stage_timing import timed
from pipeline.data.corpus import DownloadCache
from pipeline.data.instructions import load_examples, split_dataset
from pipeline.data.labelled import balance, classify_texts, split
from pipeline.evaluation.classify_metrics import evaluate_splits, plot_confusion
from pipeline.model.checkpoint import load_with_tokenizer, save_trained
from pipeline.model.runtime import is_main
from pipeline.train import distributed
from pipeline.train.classifier import ClassifyObjective, build_classifier, encode_texts
from pipeline.train.loop import train

TONE_DATA = Path("data/raw/dpo.json")
SFT_DATA = Path("data/raw/sft.json")
TOKENIZER = Path("data/tokenizer")
OUT = Path("models/classifier")
CHECKPOINTS = Path("checkpoints/classify")
REPORTS = Path("reports/classify")
PARAMS = ("data", "classify", "sft.strict", "sft.split_train", "sft.split_val", "sft.split_seed")


@exit_on_error
@timed(main_process=is_main)
def main() -> None:
    params = config.load_params(sections=PARAMS)
    p, sft = params.classify, params.sft
    distributed.relaunch_under_torchrun("stages.classify", p)
    base_dir = Path("models") / p.model
    start = load_with_tokenizer(base_dir, TOKENIZER)
    texts, origin, left_out = classify_texts(p, DownloadCache.from_params(params.data), TONE_DATA)
    held_out = set()
    if p.data is None:  # the tone data answers the SFT prompts: its test prompts stay out of training
        examples = load_examples(SFT_DATA, sft.strict).records
        held_out = {
            e.key
            for e in split_dataset(examples, sft.split_train, sft.split_val, sft.split_seed, str(SFT_DATA))[2]
        }
    parts = split(
        balance(texts, p.split_seed) if p.balance else texts,
        p.split_train,
        p.split_val,
        p.split_seed,
        origin,
        held_out,
    )
    labels = sorted({t.label for t in texts})
    context = start.model.cfg.context_length
    splits = {
        name: encode_texts(start.enc, [t.text for t in part], [labels.index(t.label) for t in part], context)
        for name, part in (("train", parts.train), ("val", parts.val), ("test", parts.test))
    }
    model = build_classifier(start.model, len(labels), p.trainable, p.lora, p.seed)
    pad = start.enc.eot_token
    objective = ClassifyObjective(
        splits["train"],
        splits["val"],
        batch_size=p.batch_size,
        grad_accum=p.grad_accum,
        eval_batches=p.eval_batches,
        pad_id=pad,
        seed=p.seed,
    )
    fingerprint = hashlib.sha256(
        json.dumps([[s.ids, s.labels] for s in splits.values()]).encode()
    ).hexdigest()
    result = train(
        model,
        objective,
        p,
        checkpoint_dir=CHECKPOINTS,
        report_dir=REPORTS,
        desc="classify",
        data_fingerprint=fingerprint,
    )
    if not is_main():
        return
    model = save_trained(
        OUT,
        result.model,
        base=base_dir,
        labels=labels,
        stage="classify",
        tokenizer={"path": str(TOKENIZER), "fingerprint": start.tokenizer_fingerprint},
        provenance=provenance(("data", "classify", "sft")),
    )
    scores = evaluate_splits(model, splits, labels, pad, p.batch_size)
    plot_confusion(scores["test"]["confusion"], labels, REPORTS / "confusion.png", f"{OUT} on the test split")
    data = {
        "records": len(texts),
        **left_out,
        "held_out_in_test": sum(t.key in held_out for t in texts),
        **{name: len(s.ids) for name, s in splits.items()},
        "truncated": sum(s.truncated for s in splits.values()),
    }
    metrics_path = REPORTS / "metrics.json"
    write_json(
        metrics_path, {**json.loads(metrics_path.read_text()), **scores, "labels": labels, "data": data}
    )
    test = scores["test"]
    print(
        f"classify: test accuracy {test['accuracy']:.1%} (majority baseline {test['majority_baseline']:.1%}), "
        f"macro-F1 {test['macro_f1']:.3f}; {len(labels)} classes, {data['truncated']} texts truncated -> {OUT}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
