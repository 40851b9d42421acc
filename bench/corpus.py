"""A dataset-sized corpus through the download and tokenize stages: throughput against raw tiktoken, and memory.

    python -m bench.corpus [--gb 2] [--small-gb 0.2] [--rounds 2] [--dir DIR] [--keep]

Writes ``--gb`` of text as dataset shards under ``--dir`` (default: the system temp dir): alternately JSONL.gz
and Parquet (10,000-row groups), ~100 MB of text each, records of 1–6 paragraphs drawn (seeded) from the shared
texts (Quijote, Tiny Shakespeare, The Verdict; generated Spanish when ../shared is absent). Then, in a temp
project with the params.yaml settings (``corpus.sources`` = the shards, ``tokenizer.train_bytes`` = 32 MiB),
runs ``python -m stages.download`` and ``python -m stages.tokenize`` — the stages' own code, no DVC (which
would cache the corpus twice) — and measures each process's wall time, CPU time and peak RSS:
  pipeline  download (read + decompress + parse + clean + write corpus.txt) + tokenize's encode+write, i.e. the
            tokenize wall time less its tokenizer training (reported apart, from its metrics.json);
  raw       in this process, ``encode_ordinary_batch`` on all cores over the same documents already decoded,
            in batches of ``shards.batch_bytes`` (reading and decoding not timed) — the ceiling;
on ``--small-gb`` of the shards first, then on all of them: peak RSS must not grow with the corpus. On the big
corpus pipeline and raw runs alternate (pipeline, raw, pipeline, raw for ``--rounds 2``) and each pipeline run
is compared with the raw runs next to it: this VM's speed drifts by a third over minutes, the same code and
data included. ``ratio`` is the mean over rounds. The corpus is deleted at the end unless ``--keep``. The last
line is a key=value summary.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.tokenize import text_batches
from pipeline.common.config import load_params
from pipeline.data.corpus import read_raw
from pipeline.data.shards import encode_threads, piece_bytes
from pipeline.data.textstream import read_blocks, split_tail
from pipeline.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHARD_TEXT_BYTES = 100_000_000
TRAIN_BYTES = 32 << 20


def paragraphs() -> list[str]:
    """The shared texts' paragraphs (blank-line separated), unwrapped: the raw material of the records."""
    from pipeline.data.corpus import clean_text

    texts = []
    for name in ("quijote.txt", "tinyshakespeare.txt", "the-verdict.txt"):
        if (SHARED / name).is_file():
            texts.append(
                clean_text((SHARED / name).read_bytes(), name, gutenberg=True, normalise=True, unwrap=True)
            )
    if not texts:
        from tests.helpers.project import generated_corpus

        texts = [generated_corpus(3_000_000)]
    return [p.strip() for text in texts for p in text.split("\n\n") if len(p.strip()) > 40]


def write_shards(directory: Path, total_bytes: int, shard_bytes: int, seed: int = 0) -> list[Path]:
    """Dataset shards of ~``shard_bytes`` of text each, JSONL.gz and Parquet in turn (kept between runs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    pool = paragraphs()
    files = []
    for i in range(-(-total_bytes // shard_bytes)):
        path = directory / (f"web-{i:04d}.jsonl.gz" if i % 2 == 0 else f"web-{i:04d}.parquet")
        files.append(path)
        if path.is_file():
            continue
        rng, records, size = random.Random(seed * 1000 + i), [], 0
        while size < shard_bytes:
            start = rng.randrange(len(pool))
            text = "\n\n".join(pool[start : start + rng.randint(1, 6)])
            records.append({"id": f"{i}-{len(records)}", "lang": "es", "text": text})
            size += len(text.encode())
        tmp = path.with_suffix(".tmp")
        if path.suffix == ".gz":
            with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=6) as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            pq.write_table(pa.Table.from_pylist(records), tmp, row_group_size=10_000)
        tmp.rename(path)
    return files


def make_project(directory: Path, shards: list[Path]) -> Path:
    """A temp project: the stages' code and params.yaml with the shards as corpus.sources."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, directory / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["corpus"]["sources"] = [str(p) for p in shards]
    params["tokenizer"]["train_bytes"] = TRAIN_BYTES
    if (SHARED / "instruction-data.json").is_file():
        params["sft"]["data"] = str(SHARED / "instruction-data.json")
        params["dpo"]["data"] = str(SHARED / "instruction-data-with-preference.json")
    else:
        from tests.helpers.project import generated_instructions

        for section, seed in (("sft", 0), ("dpo", 1)):
            path = directory / f"{section}.json"
            path.write_text(json.dumps(generated_instructions(60, seed=seed, preferences=section == "dpo")))
            params[section]["data"] = str(path)
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return directory


# Runs a stage as `python -m stages.<name>` does, then writes its own peak RSS (VmHWM) to $BENCH_RSS_FILE.
# Not the rusage of the child: ru_maxrss carries the parent's peak over through vfork + exec.
_STAGE = """
import atexit, os, runpy, sys
def _peak():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    open(os.environ["BENCH_RSS_FILE"], "w").write(line.split()[1])
atexit.register(_peak)
sys.argv = [sys.argv[1]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_stage(project: Path, name: str) -> dict:
    """``python -m stages.<name>`` in ``project``: its wall time, CPU time (os.wait4) and peak RSS (its VmHWM)."""
    rss_file = project / f".rss-{name}"
    env = {**os.environ, "PYTHONPATH": str(project), "BENCH_RSS_FILE": str(rss_file)}
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", _STAGE, f"stages.{name}"], cwd=project, env=env, stderr=subprocess.PIPE
    )
    stderr = child.stderr.read().decode()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"stages.{name} failed:\n{stderr}")
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": int(rss_file.read_text()) / 1024,
    }


def pipeline_run(project: Path) -> dict:
    download = run_stage(project, "download")
    tokenize = run_stage(project, "tokenize")
    metrics = json.loads((project / "reports/tokenize/metrics.json").read_text())
    train_seconds = metrics["tokenizer"]["train_seconds"]
    return {
        "text_bytes": sum(metrics["text_bytes"].values()),
        "tokens": metrics["tokens"]["total"],
        "download_seconds": download["seconds"],
        "tokenize_seconds": tokenize["seconds"] - train_seconds,
        "seconds": download["seconds"] + tokenize["seconds"] - train_seconds,
        "train_seconds": train_seconds,
        "cpu_seconds": download["cpu_seconds"]
        + tokenize["cpu_seconds"]
        - metrics["tokenizer"]["train_cpu_seconds"],
        "peak_rss_download_mb": download["peak_rss_mb"],
        "peak_rss_tokenize_mb": tokenize["peak_rss_mb"],
        "documents": json.loads((project / "data/raw/manifest.json").read_text())["files"]["documents.bin"][
            "documents"
        ],
    }


def raw_encode(project: Path, val_fraction: float, batch_bytes: int, threads: int) -> dict:
    """encode_ordinary_batch alone over the pipeline's corpus.txt, decoded batch by batch (only encoding timed)."""
    enc = load_tokenizer(project / "data/tokenizer")
    corpus, documents = read_raw(project / "data/raw")
    train, val = split_tail(corpus, documents, val_fraction)  # the stage's segments: the same texts
    seconds = cpu = 0.0
    tokens = 0
    blocks = itertools.chain(
        *(read_blocks(corpus, split, piece_bytes(batch_bytes, threads)) for split in (train, val))
    )
    for texts in text_batches(blocks, batch_bytes):
        started, cpu_started = time.perf_counter(), time.process_time()
        tokens += sum(map(len, enc.encode_ordinary_batch(texts, num_threads=threads)))
        seconds += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
    return {"tokens": tokens, "documents": len(train) + len(val), "seconds": seconds, "cpu_seconds": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--gb", type=float, default=2.0, help="corpus size (GB of text) for the throughput comparison"
    )
    parser.add_argument(
        "--small-gb", type=float, default=0.2, help="a smaller corpus: peak RSS must not grow with size"
    )
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "llm-pipeline-bench-corpus")
    parser.add_argument("--keep", action="store_true", help="keep the generated shards for the next run")
    parser.add_argument(
        "--rounds", type=int, default=2, help="pipeline runs on the big corpus, raw runs between them"
    )
    args = parser.parse_args()
    shards = load_params(ROOT / "params.yaml").shards
    threads = encode_threads()
    started = time.perf_counter()
    shard_bytes = min(SHARD_TEXT_BYTES, max(int(args.gb * 1e9) // 4, 1 << 20))  # small --gb: a smoke test
    files = write_shards(args.dir / "shards", int(args.gb * 1e9), shard_bytes)
    on_disk = sum(f.stat().st_size for f in files) / 1e9
    print(
        f"{len(files)} shards, {on_disk:.2f} GB on disk, written in {time.perf_counter() - started:.0f}s; "
        f"{threads} threads, batch_bytes {shards.batch_bytes}, tokenizer.train_bytes {TRAIN_BYTES}",
        flush=True,
    )
    try:
        small_files = files[: max(2, round(args.small_gb * 1e9 / shard_bytes))]
        small = pipeline_run(make_project(args.dir / "small", small_files))
        print(f"small: {json.dumps(small)}", flush=True)
        shutil.rmtree(args.dir / "small")
        big_project = make_project(args.dir / "big", files)
        bigs, raws = [], []
        # Pipeline first: it makes the data/raw and tokenizer that raw encodes with
        for _ in range(args.rounds):
            bigs.append(pipeline_run(big_project))
            print(f"big: {json.dumps(bigs[-1])}", flush=True)
            raws.append(raw_encode(big_project, shards.val_fraction, shards.batch_bytes, threads))
            print(f"raw: {json.dumps(raws[-1])}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    for big in bigs:
        assert big["tokens"] == raws[0]["tokens"] + raws[0]["documents"], (
            "pipeline and raw tokens differ beyond the EOTs"
        )

    print(
        f"{'path':<40} {'GB':>6} {'MB/s':>7} {'tokens/s':>11} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12}"
    )
    for name, run in (
        ("pipeline (small)", small),
        *((f"pipeline round {i + 1}", big) for i, big in enumerate(bigs)),
    ):
        print(
            f"{name + ' download+encode+write':<40} {run['text_bytes'] / 1e9:>6.2f} "
            f"{run['text_bytes'] / 1e6 / run['seconds']:>7.2f} {run['tokens'] / run['seconds']:>11,.0f} "
            f"{run['seconds']:>8.1f} {run['cpu_seconds']:>8.1f} "
            f"{max(run['peak_rss_download_mb'], run['peak_rss_tokenize_mb']):>12.0f}"
        )
        print(
            f"{'  of which download':<40} {'':>6} {run['text_bytes'] / 1e6 / run['download_seconds']:>7.2f} "
            f"{'':>11} {run['download_seconds']:>8.1f} {'':>8} {run['peak_rss_download_mb']:>12.0f}"
        )
        print(
            f"{'  tokenizer training (apart)':<40} {TRAIN_BYTES / 1e9:>6.3f} {'':>7} {'':>11} {run['train_seconds']:>8.1f}"
        )
    text_bytes = bigs[0]["text_bytes"]
    for i, raw in enumerate(raws):
        print(
            f"{f'raw encode_ordinary_batch {i + 1}':<40} {text_bytes / 1e9:>6.2f} {text_bytes / 1e6 / raw['seconds']:>7.2f} "
            f"{raw['tokens'] / raw['seconds']:>11,.0f} {raw['seconds']:>8.1f} {raw['cpu_seconds']:>8.1f}"
        )

    # The raw runs next to each pipeline run: after the first, around the rest
    def around(key: str) -> list[float]:
        return [raws[0][key]] + [(raws[i - 1][key] + raws[i][key]) / 2 for i in range(1, len(bigs))]

    ratios = [r / big["seconds"] for r, big in zip(around("seconds"), bigs, strict=True)]
    cpu_ratios = [r / big["cpu_seconds"] for r, big in zip(around("cpu_seconds"), bigs, strict=True)]
    seconds = sum(big["seconds"] for big in bigs) / len(bigs)
    raw_seconds = sum(raw["seconds"] for raw in raws) / len(raws)
    peak = max(max(big["peak_rss_download_mb"], big["peak_rss_tokenize_mb"]) for big in bigs)
    print(f"ratio per round (raw around it / pipeline): {', '.join(f'{r:.3f}' for r in ratios)}")
    print(
        f"corpus_gb={text_bytes / 1e9:.2f} small_gb={small['text_bytes'] / 1e9:.2f} documents={bigs[0]['documents']} "
        f"tokens={bigs[0]['tokens']} threads={threads} rounds={len(bigs)} pipeline_mb_s={text_bytes / 1e6 / seconds:.2f} "
        f"raw_mb_s={text_bytes / 1e6 / raw_seconds:.2f} pipeline_tokens_s={bigs[0]['tokens'] / seconds:.0f} "
        f"ratio={sum(ratios) / len(ratios):.3f} cpu_ratio={sum(cpu_ratios) / len(cpu_ratios):.3f} "
        f"train_seconds={bigs[0]['train_seconds']:.1f} peak_rss_mb={peak:.0f} "
        f"peak_rss_small_mb={max(small['peak_rss_download_mb'], small['peak_rss_tokenize_mb']):.0f}"
    )


if __name__ == "__main__":
    main()
