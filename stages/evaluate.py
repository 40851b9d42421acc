"""evaluate stage: models/base on the validation shards → reports/evaluate/{metrics.json,report.md,loss.png,samples.json}."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline.common.atomic import atomic_path, write_json
from pipeline.common.config import load_params
from pipeline.common.errors import exit_on_error
from pipeline.common.stage_timing import timed
from pipeline.data.shards import ShardDataset
from pipeline.evaluation.base_model import (
    language_model_metrics,
    markdown_report,
    plot_loss,
    samples,
    token_byte_lengths,
    unigram_log_probs,
)
from pipeline.model.checkpoint import load_with_tokenizer
from pipeline.model.runtime import local_device, resolve_dtype
from pipeline.model.sampling import SamplingOptions

MODEL = Path("models/base")
TOKENIZER = Path("data/tokenizer")
SHARDS = Path("data/shards")
PLOTS = Path("reports/pretrain/plots/metrics")
OUT = Path("reports/evaluate")
PARAMS = ("evaluate",)


@exit_on_error
@timed
def main() -> None:
    p = load_params(sections=PARAMS).evaluate
    device = local_device("auto")
    loaded = load_with_tokenizer(MODEL, TOKENIZER, device)
    model, meta, enc, fingerprint = loaded.model, loaded.meta, loaded.enc, loaded.tokenizer_fingerprint
    train = ShardDataset(SHARDS, "train", expected_fingerprint=fingerprint)
    val = ShardDataset(SHARDS, "val", expected_fingerprint=fingerprint)
    torch.manual_seed(p.seed)
    metrics = language_model_metrics(
        model,
        val,
        unigram_log_probs(train, enc.n_vocab),
        token_byte_lengths(enc),
        p.batch_size,
        p.batches,
        resolve_dtype(p.dtype, device, model.cfg, p.batch_size * model.cfg.context_length),
    )
    opts = SamplingOptions(
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_k=p.top_k,
        eos_id=enc.eot_token,
        seed=p.seed,
    )
    sample_rows = samples(model, enc, p.prompts, opts)
    cfg = model.cfg
    model_line = (
        f"Model: {model.num_params() / 1e6:.1f}M parameters ({cfg.n_layer} layers, {cfg.n_head} heads, "
        f"width {cfg.n_embd}, context {cfg.context_length}, vocab {cfg.vocab_size}), "
        f"{meta.get('training', {}).get('steps', '?')} pretraining steps."
    )
    plot_loss(PLOTS, metrics, OUT / "loss.png", f"pretraining: {model.num_params() / 1e6:.1f}M params")
    write_json(OUT / "samples.json", sample_rows)
    with atomic_path(OUT / "report.md") as tmp:
        tmp.write_text(markdown_report(metrics, sample_rows, model_line, "loss.png") + "\n", encoding="utf-8")
    write_json(OUT / "metrics.json", metrics.as_dict())
    print(
        f"evaluate: val loss {metrics.val_loss:.4f} (unigram {metrics.unigram_loss:.4f}), "
        f"{metrics.bits_per_byte:.3f} bits/byte, accuracy {metrics.accuracy:.1%}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
