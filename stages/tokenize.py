"""tokenize: data/raw → data/tokenizer (trained or loaded) + data/shards (train/val) + reports/tokenize/metrics.json."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipeline.common.atomic import atomic_path, write_json
from pipeline.common.config import TokenizerParams, load_params
from pipeline.common.errors import exit_on_error
from pipeline.common.stage_timing import timed
from pipeline.data import tokenizer_json
from pipeline.data.corpus import read_raw
from pipeline.data.instructions import instruction_texts
from pipeline.data.shards import encode_threads, write_shards
from pipeline.data.textstream import Segment, read_blocks, sample_text, split_tail, total_bytes
from pipeline.data.tokenizer import save_tokenizer, train_tokenizer

RAW, TOKENIZER, SHARDS = Path("data/raw"), Path("data/tokenizer"), Path("data/shards")
METRICS = Path("reports/tokenize/metrics.json")
PARAMS = ("tokenizer", "shards")


def training_texts(
    params: TokenizerParams, corpus: Path, train: Sequence[Segment], block_bytes: int
) -> Iterator[str]:
    """The train split (or a seeded sample of ``tokenizer.train_bytes`` of it), then the instruction text."""
    if params.train_bytes is not None and params.train_bytes < total_bytes(train):
        texts = sample_text(corpus, train, params.train_bytes, params.seed)
    else:
        texts = (text for text, _, _ in read_blocks(corpus, train, block_bytes))
    if params.include_instruction_text:
        return itertools.chain(texts, instruction_texts([RAW / "sft.json", RAW / "dpo.json"]))
    return texts


@exit_on_error
@timed
def main() -> None:
    params = load_params(sections=PARAMS)
    tok, sh = params.tokenizer, params.shards
    corpus, documents = read_raw(RAW)
    train, val = split_tail(corpus, documents, sh.val_fraction)
    started, cpu_started = time.perf_counter(), time.process_time()
    texts = training_texts(tok, corpus, train, sh.batch_bytes)
    if tok.kind == "hf":  # a model's own tokenizer.json, proven on the corpus (nothing trained)
        enc, extra = tokenizer_json.load_checked(tok.source, tok.revision, texts)
    else:
        enc, extra = train_tokenizer(tok.kind, texts, tok.vocab_size), {}
    train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    with atomic_path(TOKENIZER) as tok_dir, atomic_path(SHARDS) as shard_dir:
        fingerprint = save_tokenizer(
            enc,
            tok_dir,
            tok.kind,
            params={
                "vocab_size": tok.vocab_size,
                "include_instruction_text": tok.include_instruction_text,
                "train_bytes": tok.train_bytes,
                "seed": tok.seed,
            },
            **extra,
        )
        started = time.perf_counter()
        manifest = write_shards(
            enc,
            corpus,
            {"train": train, "val": val},
            shard_dir,
            fingerprint=fingerprint,
            shard_tokens=sh.shard_tokens,
            batch_bytes=sh.batch_bytes,
        )
        encode_seconds = time.perf_counter() - started
    splits = manifest["splits"]
    text_bytes = sum(s["text_bytes"] for s in splits.values())
    metrics = {
        "tokenizer": {
            "kind": tok.kind,
            "vocab_size": enc.n_vocab,
            "train_seconds": round(train_seconds, 3),
            "train_cpu_seconds": round(train_cpu_seconds, 3),
        },
        "tokens": {name: s["tokens"] for name, s in splits.items()} | {"total": manifest["total_tokens"]},
        "text_bytes": {name: s["text_bytes"] for name, s in splits.items()},
        "bytes_per_token": round(text_bytes / manifest["total_tokens"], 4),
        "shards": sum(len(s["shards"]) for s in splits.values()),
        "dtype": manifest["dtype"],
        "throughput": {
            "seconds": round(encode_seconds, 3),
            "threads": encode_threads(),
            "mb_per_s": round(text_bytes / 1e6 / encode_seconds, 3),
            "tokens_per_s": round(manifest["total_tokens"] / encode_seconds),
        },
    }
    write_json(METRICS, metrics)
    print(
        f"tokenize: {tok.kind} vocab {enc.n_vocab}, train {splits['train']['tokens']:,} / val "
        f"{splits['val']['tokens']:,} tokens, {metrics['bytes_per_token']} bytes/token → {SHARDS}/",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
