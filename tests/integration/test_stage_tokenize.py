"""The download and tokenize stages for real: `dvc repro tokenize` in a temp git/DVC project, and bad input."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.data.shards import ShardDataset
from pipeline.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from tests.helpers.project import ROOT, generated_corpus, make_project, venv_env


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**venv_env(), "PYTHONPATH": str(cwd)}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def stage(project: Path, name: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", f"stages.{name}"], project)


def set_params(project: Path, section: str, **values) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section] = {**(params.get(section) or {}), **values}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def assert_failed_cleanly(
    out: subprocess.CompletedProcess, project: Path, message: str, outputs: list[str]
) -> None:
    """Exit != 0, exactly one line on stderr naming the problem, no output and no temp leftovers."""
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert message in lines[0], lines[0]
    for name in outputs:
        assert not (project / name).exists(), f"partial output {name} left behind"
    leftovers = (
        [p.name for p in (project / "data").iterdir() if p.name.startswith(".")]
        if (project / "data").exists()
        else []
    )
    assert not leftovers, leftovers


def test_dvc_repro_tokenize_then_no_op(tmp_path):
    project = make_project(tmp_path / "p")
    first = run(["dvc", "repro", "tokenize"], project)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'download'" in first.stdout and "Running stage 'tokenize'" in first.stdout

    enc = load_tokenizer(project / "data/tokenizer")
    fingerprint = tokenizer_fingerprint(project / "data/tokenizer")
    metrics = json.loads((project / "reports/tokenize/metrics.json").read_text())
    manifest = json.loads((project / "data/shards/manifest.json").read_text())
    assert enc.n_vocab == 512 == metrics["tokenizer"]["vocab_size"]
    assert manifest["tokenizer_fingerprint"] == fingerprint and manifest["dtype"] == "uint16"
    train = ShardDataset(project / "data/shards", "train", expected_fingerprint=fingerprint)
    val = ShardDataset(project / "data/shards", "val", expected_fingerprint=fingerprint)
    assert train.num_tokens == metrics["tokens"]["train"] and val.num_tokens == metrics["tokens"]["val"]
    assert (
        0.05 < val.text_bytes / (train.text_bytes + val.text_bytes) < 0.15
    )  # val_fraction 0.1 of one document
    assert len(manifest["splits"]["train"]["shards"]) >= 2  # shard_tokens 20000 in the tiny params
    corpus = (project / "data/raw/corpus.txt").read_bytes()
    tokens = [int(t) for ds in (train, val) for array in ds.arrays for t in array]
    eot, cut = b"<|endoftext|>", train.text_bytes
    assert enc.decode_bytes(tokens) == corpus[:cut] + eot + corpus[cut:] + eot  # one document, split in two
    assert metrics["bytes_per_token"] == round(len(corpus) / len(tokens), 4)
    assert metrics["tokenizer"]["train_seconds"] > 0 and metrics["throughput"]["tokens_per_s"] > 0

    before = {p.name: p.stat().st_mtime_ns for p in (project / "data/shards").iterdir()}
    second = run(["dvc", "repro", "tokenize"], project)
    assert second.returncode == 0, second.stderr
    assert "Stage 'tokenize' didn't change, skipping" in second.stdout
    assert "Running stage" not in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (project / "data/shards").iterdir()} == before

    shard = project / "data/shards/train_0000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    reader = (
        "from pipeline.common.errors import exit_on_error\nfrom pipeline.data.shards import ShardDataset\n"
        "exit_on_error(lambda: ShardDataset('data/shards', 'train'))()\n"
    )
    out = run([sys.executable, "-c", reader], project)
    assert_failed_cleanly(out, project, "data/shards/train_0000.bin: ", [])
    assert "truncated" in out.stderr


def test_dvc_repro_tokenize_on_paragraphs_without_hard_wraps(tmp_path, shared_data):
    """The Verdict (one paragraph per line, blank lines between) when present, else text of that shape."""
    if shared_data is not None:
        story = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
    else:
        story = "\n\n".join(" ".join(generated_corpus(1200, seed=i).split()) for i in range(18))
    project = make_project(tmp_path / "p", corpus=story)
    out = run(["dvc", "repro", "tokenize"], project)
    assert out.returncode == 0, out.stdout + out.stderr
    corpus = (project / "data/raw/corpus.txt").read_bytes()
    val = ShardDataset(project / "data/shards", "val")
    cut = len(corpus) - val.text_bytes
    assert 0.08 < val.text_bytes / len(corpus) < 0.12 and corpus[cut - 2 : cut] == b"\n\n"
    enc = load_tokenizer(project / "data/tokenizer")
    assert enc.decode_bytes([int(t) for t in val.arrays[0]]) == corpus[cut:] + b"<|endoftext|>"


def test_tokenize_refuses_a_corpus_too_short_to_split(tmp_path):
    project = make_project(tmp_path / "p", corpus="Una frase corta.\n" * 500)
    assert stage(project, "download").returncode == 0
    out = stage(project, "tokenize")
    assert_failed_cleanly(
        out,
        project,
        "data/raw/corpus.txt: 8,500 bytes of text, too short for a val split at "
        "shards.val_fraction=0.1: each split needs at least 1,024 bytes, so the corpus at least 10,240",
        ["data/tokenizer", "data/shards", "reports/tokenize"],
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DOWNLOAD_CASES = {
    "missing file": (
        {"sources": ["inputs/missing.txt"]},
        None,
        "corpus.sources[0]: inputs/missing.txt: no such file",
    ),
    "empty corpus": ({}, b"", "corpus.sources[0] (inputs/corpus.txt): no text"),
    "undecodable": ({}, "Hola, señor.\n".encode("latin-1"), "inputs/corpus.txt): not valid UTF-8 at byte 8"),
    "sha256 mismatch": (
        {"sources": [{"path": "inputs/corpus.txt", "sha256": "0" * 64}]},
        None,
        "corpus.sources[0]: inputs/corpus.txt: sha256 mismatch",
    ),
    "unreachable url": (
        {"sources": [{"url": "http://127.0.0.1:{port}/book.txt"}]},
        None,
        "corpus.sources[0]: http://127.0.0.1:{port}/book.txt: download failed after 1 attempts",
    ),
}


@pytest.mark.parametrize("case", DOWNLOAD_CASES)
def test_download_bad_input(tmp_path, case):
    corpus_params, corpus_bytes, message = DOWNLOAD_CASES[case]
    port = _closed_port()
    corpus_params = json.loads(json.dumps(corpus_params).replace("{port}", str(port)))
    project = make_project(tmp_path / "p", {"corpus": corpus_params, "data": {"retries": 0}})
    if corpus_bytes is not None:
        (project / "inputs/corpus.txt").write_bytes(corpus_bytes)
    out = stage(project, "download")
    assert_failed_cleanly(out, project, message.replace("{port}", str(port)), ["data/raw"])


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory) -> Path:
    project = make_project(tmp_path_factory.mktemp("downloaded") / "p")
    out = stage(project, "download")
    assert out.returncode == 0, out.stderr
    return project


TOKENIZE_CASES = {
    "unknown tokenizer kind": (
        ("tokenizer", {"kind": "wordpiece"}),
        "params.yaml: tokenizer.kind must be one of",
    ),
    "unknown params key": (
        ("tokenizer", {"vocab_sise": 512}),
        "params.yaml: unknown key 'tokenizer.vocab_sise'",
    ),
    "val fraction out of range": (("shards", {"val_fraction": 1.5}), "shards.val_fraction must be in (0, 1)"),
}


@pytest.mark.parametrize("case", TOKENIZE_CASES)
def test_tokenize_bad_params(downloaded, case):
    (section, values), message = TOKENIZE_CASES[case]
    original = (downloaded / "params.yaml").read_text()
    set_params(downloaded, section, **values)
    try:
        out = stage(downloaded, "tokenize")
    finally:
        (downloaded / "params.yaml").write_text(original)
    assert_failed_cleanly(out, downloaded, message, ["data/tokenizer", "data/shards", "reports/tokenize"])


def test_tokenize_fails_midway_without_partial_outputs(downloaded, tmp_path):
    """Bad bytes in the validation part break the stage after the tokenizer and train shards were written."""
    project = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(downloaded), str(project)], check=True)
    corpus = project / "data/raw/corpus.txt"
    data = bytearray(corpus.read_bytes())
    data[-10] = 0xFF
    corpus.write_bytes(bytes(data))
    out = stage(project, "tokenize")
    assert_failed_cleanly(
        out,
        project,
        f"data/raw/corpus.txt: not valid UTF-8 at byte {len(data) - 10}",
        ["data/tokenizer", "data/shards", "reports/tokenize"],
    )


def test_tokenize_without_download(tmp_path):
    project = make_project(tmp_path / "p")
    out = stage(project, "tokenize")
    assert_failed_cleanly(
        out,
        project,
        "data/raw/manifest.json: not found (run `dvc repro download`)",
        ["data/tokenizer", "data/shards"],
    )


def test_instruction_text_reaches_the_tokenizer(downloaded):
    """With include_instruction_text the (English) SFT/DPO fields are part of the BPE training text."""
    from stages.tokenize import instruction_texts

    records = json.loads((downloaded / "data/raw/dpo.json").read_text())
    texts = list(instruction_texts([downloaded / "data/raw/sft.json", downloaded / "data/raw/dpo.json"]))
    assert records[0]["instruction"] in texts and records[0]["rejected"] in texts
    assert all(isinstance(t, str) and t for t in texts)


def test_data_stages_do_not_import_torch():
    """download and tokenize stay light: no torch in their processes (memory, start-up time)."""
    code = (
        "import sys, stages.download, stages.tokenize\nassert 'torch' not in sys.modules, 'torch imported'\n"
    )
    out = run([sys.executable, "-c", code], ROOT)
    assert out.returncode == 0, out.stderr
