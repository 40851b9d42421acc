"""Tokenize throughput and memory: the stage's encode+write path vs raw tiktoken batch encoding, same run.

    python -m bench.tokenize [--mb 200] [--small-mb 50]

Builds a corpus of Quijote copies (one document each; ../shared/data/quijote.txt, else generated Spanish)
under /tmp, trains the params.yaml tokenizer on one copy, then measures on the same text and threads:
  raw    ``enc.encode_ordinary_batch`` over the text already in memory, in the stage's own pieces (results
         dropped) — the ceiling;
  stage  ``pipeline.data.shards.write_shards`` exactly as the tokenize stage calls it (file → pieces → encode →
         uint16 shards + sha256 + manifest), in a subprocess that imports what the stage imports, so its
         peak RSS is its own. It runs on a smaller corpus too: peak RSS must not grow with corpus size.
Raw and stage runs alternate (raw, stage, raw, stage, raw): each stage run is compared with the mean of the
raw runs around it and ``ratio`` is the mean over rounds (the machine is shared and drifts); ``cpu_ratio``
compares CPU seconds of all threads instead, which other tenants of the machine disturb far less.
The last line is a key=value summary.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.common.config import load_params
from pipeline.data.corpus import clean_text
from pipeline.data.shards import encode_threads, piece_bytes
from pipeline.data.textstream import Segment, read_blocks, split_tail
from pipeline.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]

QUIJOTE = ROOT.parent / "shared" / "data" / "quijote.txt"
WORK = Path(tempfile.gettempdir()) / "llm-pipeline-bench-tokenize"


def book() -> str:
    if QUIJOTE.is_file():
        return clean_text(QUIJOTE.read_bytes(), str(QUIJOTE), gutenberg=True, normalise=True)
    from tests.helpers.project import generated_corpus

    return generated_corpus(2_200_000)


def build_corpus(text: str, megabytes: int) -> tuple[Path, list[Segment]]:
    """``megabytes`` of text as copies of ``text``, one document per copy (written once, reused)."""
    data = text.encode()
    copies = -(-megabytes * 1_000_000 // len(data))
    path = WORK / f"corpus_{megabytes}mb.txt"
    if not path.is_file() or path.stat().st_size != copies * len(data):
        with path.open("wb") as f:
            for _ in range(copies):
                f.write(data)
    return path, [Segment(i * len(data), len(data)) for i in range(copies)]


def stage_path(corpus: Path, doc_bytes: int, tokenizer: Path, out: Path) -> dict:
    """The tokenize stage's encode+write path with the params.yaml shard settings, measured in this process."""
    import stages.tokenize  # noqa: F401  (the stage's imports count towards its RSS)
    from pipeline.data.shards import write_shards
    from pipeline.data.tokenizer import tokenizer_fingerprint

    shards = load_params(ROOT / "params.yaml").shards
    size = corpus.stat().st_size
    documents = [Segment(offset, doc_bytes) for offset in range(0, size, doc_bytes)]
    enc = load_tokenizer(tokenizer)
    train, val = split_tail(corpus, documents, shards.val_fraction)
    started, cpu = time.perf_counter(), time.process_time()
    manifest = write_shards(
        enc,
        corpus,
        {"train": train, "val": val},
        out,
        fingerprint=tokenizer_fingerprint(tokenizer),
        shard_tokens=shards.shard_tokens,
        batch_bytes=shards.batch_bytes,
    )
    return {
        "bytes": size,
        "tokens": manifest["total_tokens"],
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux's VmHWM, because ru_maxrss carries over the parent's peak through
    fork/vfork + exec (the bench parent holds the whole corpus in memory)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def text_batches(blocks: Iterable[tuple[str, int, bool]], batch_bytes: int) -> Iterator[list[str]]:
    """``read_blocks``' texts in batches of about ``batch_bytes``: what raw ``encode_ordinary_batch`` is given."""
    texts, size = [], 0
    for text, n_bytes, _ in blocks:
        texts.append(text)
        size += n_bytes
        if size >= batch_bytes:
            yield texts
            texts, size = [], 0
    if texts:
        yield texts


def raw_encode(enc, corpus: Path, documents: list[Segment], batch_bytes: int, threads: int) -> dict:
    """encode_ordinary_batch alone, on the same pieces and threads, with the text already in memory."""
    blocks = read_blocks(corpus, documents, piece_bytes(batch_bytes, threads))
    batches = list(text_batches(blocks, batch_bytes))
    tokens, started, cpu = 0, time.perf_counter(), time.process_time()
    for texts in batches:
        tokens += sum(map(len, enc.encode_ordinary_batch(texts, num_threads=threads)))
    return {
        "bytes": corpus.stat().st_size,
        "tokens": tokens,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
    }


def run_stage_subprocess(corpus: Path, doc_bytes: int, tokenizer: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=WORK) as out:
        cmd = [
            sys.executable,
            "-m",
            "bench.tokenize",
            "--stage-path",
            str(corpus),
            str(doc_bytes),
            str(tokenizer),
            str(Path(out) / "shards"),
        ]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="corpus size for the throughput comparison")
    parser.add_argument(
        "--small-mb", type=int, default=50, help="a smaller corpus: peak RSS must not grow with size"
    )
    parser.add_argument("--rounds", type=int, default=2, help="stage runs, each between two raw runs")
    parser.add_argument("--stage-path", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage_path:
        corpus, doc_bytes, tokenizer, out = args.stage_path
        print(json.dumps(stage_path(Path(corpus), int(doc_bytes), Path(tokenizer), Path(out))))
        return

    params = load_params(ROOT / "params.yaml")
    WORK.mkdir(parents=True, exist_ok=True)
    text = book()
    big, big_docs = build_corpus(text, args.mb)
    small, small_docs = build_corpus(text, args.small_mb)
    tokenizer = WORK / "tokenizer"
    started = time.perf_counter()
    enc = train_tokenizer(params.tokenizer.kind, [text], params.tokenizer.vocab_size)
    train_seconds = time.perf_counter() - started
    save_tokenizer(enc, tokenizer, params.tokenizer.kind)
    threads = encode_threads()
    print(
        f"corpus {big.stat().st_size / 1e6:.0f} MB ({len(big_docs)} copies), tokenizer {params.tokenizer.kind} "
        f"vocab {enc.n_vocab} (trained in {train_seconds:.2f}s on one copy), {threads} threads, "
        f"batch_bytes {params.shards.batch_bytes}"
    )

    train, val = split_tail(
        big, big_docs, params.shards.val_fraction
    )  # the stage's segments: same text, same cuts
    segments = train + val
    raws = [raw_encode(enc, big, segments, params.shards.batch_bytes, threads)]
    stage_runs = []
    # Raw, stage, raw, stage, raw: each stage run compared with the raw runs around it
    for _ in range(args.rounds):
        stage_runs.append(run_stage_subprocess(big, big_docs[0].length, tokenizer))
        raws.append(raw_encode(enc, big, segments, params.shards.batch_bytes, threads))
    small_stage = run_stage_subprocess(small, small_docs[0].length, tokenizer)
    for run in stage_runs:
        assert run["tokens"] == raws[0]["tokens"] + len(segments), (
            "stage and raw tokens differ beyond one EOT per document"
        )

    mb = big.stat().st_size / 1e6
    print(f"{'path':<36} {'MB/s':>8} {'tokens/s':>12} {'seconds':>8} {'CPU s':>8}")
    for i, raw in enumerate(raws):
        rows = [(f"raw encode_ordinary_batch #{i + 1}", raw)]
        if i < len(stage_runs):
            rows.append((f"stage encode+write #{i + 1}", stage_runs[i]))
        for name, r in rows:
            print(
                f"{name:<36} {mb / r['seconds']:>8.2f} {r['tokens'] / r['seconds']:>12,.0f} {r['seconds']:>8.1f} "
                f"{r['cpu_seconds']:>8.1f}"
            )
    ratios = [
        (raws[i]["seconds"] + raws[i + 1]["seconds"]) / 2 / run["seconds"] for i, run in enumerate(stage_runs)
    ]
    ratio = sum(ratios) / len(ratios)
    raw_seconds = sum(r["seconds"] for r in raws) / len(raws)
    stage_seconds = sum(r["seconds"] for r in stage_runs) / len(stage_runs)
    peak = max(r["peak_rss_mb"] for r in stage_runs)
    # CPU seconds (all threads) barely depend on what else the shared machine runs: the stage's own overhead.
    cpu_ratio = (
        sum(r["cpu_seconds"] for r in raws)
        / len(raws)
        / (sum(r["cpu_seconds"] for r in stage_runs) / len(stage_runs))
    )
    print(
        f"ratio per round (stage / mean of the raw runs around it): {', '.join(f'{r:.3f}' for r in ratios)}"
    )
    print(
        f"peak RSS of the stage path: {peak:.0f} MB on {mb:.0f} MB, "
        f"{small_stage['peak_rss_mb']:.0f} MB on {small.stat().st_size / 1e6:.0f} MB"
    )
    print(
        f"corpus_mb={mb:.0f} threads={threads} tokens={stage_runs[0]['tokens']} rounds={args.rounds} "
        f"raw_mb_s={mb / raw_seconds:.2f} stage_mb_s={mb / stage_seconds:.2f} "
        f"raw_tokens_s={raws[0]['tokens'] / raw_seconds:.0f} stage_tokens_s={stage_runs[0]['tokens'] / stage_seconds:.0f} "
        f"ratio={ratio:.3f} cpu_ratio={cpu_ratio:.3f} peak_rss_mb={peak:.0f} peak_rss_small_mb={small_stage['peak_rss_mb']:.0f} "
        f"small_mb={small.stat().st_size / 1e6:.0f}"
    )


if __name__ == "__main__":
    main()
