"""Dataset sources: JSONL/JSON/CSV/TSV/Parquet records, compression, globs, filters, Hugging Face files, bad input."""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.server
import io
import json
import math
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

from pipeline.common.config import parse_params
from pipeline.common.errors import PipelineError
from pipeline.data.corpus import DownloadCache, build_corpus
from tests.helpers.project import make_project, venv_env


@pytest.fixture(scope="module")
def records(corpus_text) -> list[dict]:
    """Paragraph-sized records with a language and an id, as a web dataset has them."""
    words = corpus_text.split()
    return [
        {"id": i, "lang": "es" if i % 4 else "en", "text": " ".join(words[i * 40 : i * 40 + 40])}
        for i in range(60)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 7) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def corpus_of(tmp_path: Path, sources: list, **corpus) -> tuple[str, list[dict]]:
    """Run build_corpus on ``sources`` as params.yaml would give them; returns (corpus text, per-source table)."""
    params = parse_params({"corpus": {"sources": sources, **corpus}})
    out = tmp_path / "raw"
    out.mkdir(exist_ok=True)
    table = build_corpus(
        params.corpus.sources, DownloadCache(tmp_path / "cache"), out, gutenberg=True, normalise=True
    )
    return (out / "corpus.txt").read_text(encoding="utf-8"), table


def test_every_format_and_compression_gives_one_document_per_record(tmp_path, records):
    rows = records[:10]
    expected = "".join(r["text"] + "\n" for r in rows)
    files = {
        "a.jsonl.gz": lambda p: write_jsonl(p, rows),
        "b.json": lambda p: p.write_text(json.dumps(rows)),
        "c.csv": lambda p: p.write_text(_csv(rows, ","), encoding="utf-8"),
        "d.tsv.zst": lambda p: p.write_bytes(zstandard.ZstdCompressor().compress(_csv(rows, "\t").encode())),
        "e.parquet": lambda p: write_parquet(p, rows),
        "f.zip": lambda p: _zip(
            p, {"notes.txt": "x", "data/g.jsonl": "".join(json.dumps(r) + "\n" for r in rows)}
        ),
    }
    for name, write in files.items():
        write(tmp_path / name)
    sources = [str(tmp_path / n) for n in files if n != "f.zip"] + [
        {"path": str(tmp_path / "f.zip"), "member": "data/g.jsonl"}
    ]
    text, table = corpus_of(tmp_path, sources)
    assert text == expected * len(files)
    assert [t["files"][0]["format"] for t in table] == ["jsonl", "json", "csv", "tsv", "parquet", "jsonl"]
    assert all(
        t["records_read"] == t["records_kept"] == t["documents"] == 10 and t["skipped"] == {} for t in table
    )
    documents = (tmp_path / "raw" / "documents.bin").read_bytes()
    assert len(documents) == 8 * 60 and int.from_bytes(documents[-8:], "little") == len(text.encode())


def _csv(rows: list[dict], delimiter: str) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter=delimiter)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _truncated_gzip(rows: list[dict]) -> bytes:
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    return data[: len(data) // 2]


def _jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def _zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_filters_text_field_globs_and_skip_counts(tmp_path, records):
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = [{"body": r["text"], "lang": r["lang"]} for r in records]
    rows[3]["body"] = "corto"
    rows[5]["body"] = None  # a null in a Parquet column
    rows[35] = {"lang": "es"}  # no text field
    rows[39]["body"] = 12  # not a string
    write_parquet(shards / "part-0.parquet", rows[:30])
    write_jsonl(shards / "part-1.jsonl.gz", rows[30:])
    (shards / "notes.md").write_text("not matched by the glob\n")
    source = {
        "path": str(shards / "part-*"),
        "text_field": "body",
        "where": {"lang": "es"},
        "min_chars": 20,
        "bad_records": "skip",
    }
    text, [entry] = corpus_of(tmp_path, [source])
    kept = [r["body"] for i, r in enumerate(rows) if i not in (3, 5, 35, 39) and r["lang"] == "es"]
    assert text == "".join(k + "\n" for k in kept)
    assert [f["file"] for f in entry["files"]] == [
        str(shards / "part-0.parquet"),
        str(shards / "part-1.jsonl.gz"),
    ]
    assert entry["records_read"] == 60 and entry["records_kept"] == len(kept) == entry["documents"]
    assert entry["skipped"] == {
        "field 'body' is a NoneType, not a string": 1,
        "field 'body' is a int, not a string": 1,
        "no field 'body'": 1,
        "shorter than min_chars=20": 1,
        "where lang != 'es'": 15,
    }
    assert entry["bytes"] == len(text.encode())


def test_directory_sources_read_each_file_by_its_format(tmp_path, records):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", records[:3])
    (folder / "b.txt").write_text("Un libro entero.\n", encoding="utf-8")
    text, [entry] = corpus_of(tmp_path, [str(folder)])
    assert text == "".join(r["text"] + "\n" for r in records[:3]) + "Un libro entero.\n"
    assert entry["documents"] == 4 and entry["records_read"] == 3


BAD_INPUT = {
    "record without the field": (
        "a.jsonl",
        lambda p, rows: write_jsonl(p, rows[:2] + [{"id": 7}]),
        {},
        r"corpus.sources\[0\] \(.*a.jsonl\): record 3: no field 'text' \(fields: id\); set text_field",
    ),
    "non-string text": (
        "a.jsonl.gz",
        lambda p, rows: write_jsonl(p, [rows[0], {"text": ["a", "b"]}]),
        {},
        r"\(.*a.jsonl.gz\): record 2: field 'text' is a list, not a string",
    ),
    "parquet without the column": (
        "a.parquet",
        lambda p, rows: write_parquet(p, [{"body": "x"}]),
        {},
        r"\(.*a.parquet\): no column 'text' \(columns: body\); set text_field",
    ),
    "corrupt gzip": (
        "a.jsonl.gz",
        lambda p, rows: p.write_bytes(_truncated_gzip(rows)),
        {},
        r"\(.*a.jsonl.gz\): not a valid gzip file \(EOFError",
    ),
    "not gzip at all": (
        "a.jsonl.gz",
        lambda p, rows: p.write_bytes(b'{"text": "hola"}\n'),
        {},
        r"\(.*a.jsonl.gz\): not a valid gzip file \(BadGzipFile",
    ),
    "text file cut in half (.txt.gz)": (
        "a.txt.gz",
        lambda p, rows: p.write_bytes(_truncated_gzip(rows)),
        {},
        r"\(.*a.txt.gz\): not a valid gzip file \(EOFError: Compressed file ended",
    ),
    "plain text named .gz": (
        "a.txt.gz",
        lambda p, rows: p.write_text("plain text, not gzip\n"),
        {},
        r"\(.*a.txt.gz\): not a valid gzip file \(BadGzipFile: Not a gzipped file",
    ),
    "truncated zstd (.jsonl.zst)": (
        "a.jsonl.zst",
        lambda p, rows: p.write_bytes(_zstd(_jsonl_bytes(rows))[:-40]),
        {},
        r"\(.*a.jsonl.zst\): not a valid zstd file \(EOFError: the file ends inside a zstd frame",
    ),
    "garbage named .zst": (
        "a.zst",
        lambda p, rows: p.write_bytes(b"not zstd at all\n" * 20),
        {},
        r"\(.*a.zst\): not a valid zstd file \(ZstdError: ",
    ),
    "csv with a quote never closed": (
        "a.csv",
        lambda p, rows: p.write_text(
            "id,text\n"
            + "".join(f"{i},row {i}\n" for i in range(1, 20))
            + '20,"open quote\n'
            + "".join(f"{i},row {i}\n" for i in range(21, 202))
        ),
        {},
        r"\(.*a.csv\): line 21: a quoted field is never closed \(unexpected end of data\)",
    ),
    "csv row with more fields than the header": (
        "a.csv",
        lambda p, rows: p.write_text("id,text\n1,uno\n2,dos, y tres\n3,tres\n"),
        {},
        r"\(.*a.csv\): line 3: 3 fields, the header has 2 \(quote a field that holds ','\)",
    ),
    "tsv row with more fields than the header": (
        "a.tsv",
        lambda p, rows: p.write_text("id\ttext\n1\tuno\n2\tdos\tmas\n"),
        {},
        r"\(.*a.tsv\): line 3: 3 fields, the header has 2",
    ),
    "zip without the member": (
        "a.zip",
        lambda p, rows: _zip(p, {"x.jsonl": "{}\n"}),
        {"member": "y.jsonl"},
        r"\(.*a.zip\): no member 'y.jsonl' \(the archive holds: x.jsonl\)",
    ),
    "zip of several files, no member": (
        "a.zip",
        lambda p, rows: _zip(p, {"x.jsonl": "", "y.jsonl": ""}),
        {},
        r"\(.*a.zip\): give `member:` \(the archive holds: x.jsonl, y.jsonl\)",
    ),
    "invalid json line": (
        "a.jsonl",
        lambda p, rows: p.write_text('{"text": "a"}\n{oops\n'),
        {},
        r"\(.*a.jsonl\): record 2: not valid JSON",
    ),
    "invalid utf-8": (
        "a.jsonl",
        lambda p, rows: p.write_bytes(b'{"text": "a"}\n{"text": "se\xf1or"}\n'),
        {},
        r"\(.*a.jsonl\): record 2: not valid UTF-8 at byte 12 of the line",
    ),
    "empty after filtering": (
        "a.jsonl",
        lambda p, rows: write_jsonl(p, rows[:8]),
        {"where": {"lang": "fr"}},
        r"corpus.sources\[0\]: .*a.jsonl: no records kept \(read 8; skipped: 8 where lang != 'fr'\)",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_dataset_input_names_source_and_record(tmp_path, records, case):
    name, write, options, message = BAD_INPUT[case]
    write(tmp_path / name, records)
    with pytest.raises(PipelineError, match=message) as error:
        corpus_of(tmp_path, [{"path": str(tmp_path / name), **options}])
    assert "\n" not in str(error.value)


def test_jsonl_zst_reads_line_by_line_across_frames(tmp_path, records):
    """zstandard's stream_reader reads no lines: a .jsonl.zst (two frames here) goes through io.BufferedReader."""
    (tmp_path / "a.jsonl.zst").write_bytes(
        _zstd(_jsonl_bytes(records[:7])) + _zstd(_jsonl_bytes(records[7:10]))
    )
    text, [entry] = corpus_of(tmp_path, [str(tmp_path / "a.jsonl.zst")])
    assert text == "".join(r["text"] + "\n" for r in records[:10]) and entry["documents"] == 10


@pytest.mark.parametrize(
    "location, message",
    [
        (
            "ftp://example.com/corpus.txt",
            r"ftp://example.com/corpus.txt: unsupported URL scheme 'ftp://'; a source is an http\(s\):// URL, "
            r"an hf://datasets/... file, or a local path$",
        ),
        (
            "file:///tmp/corpus.txt",
            r"file:///tmp/corpus.txt: unsupported URL scheme 'file://'.* \(for a local file give its path: /tmp/corpus.txt\)$",
        ),
        (
            "/dev/null",
            r"/dev/null: not a regular file \(a device, pipe or socket\); give a file or a directory$",
        ),
    ],
)
def test_unsupported_sources_say_what_is_supported(tmp_path, location, message):
    with pytest.raises(PipelineError, match=r"^corpus.sources\[0\]: " + message):
        corpus_of(tmp_path, [location])


def run_download(project: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stages.download"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**venv_env(), "PYTHONPATH": str(project), **env},
    )


@pytest.mark.integration  # the download stage's process
def test_download_stage_leaves_nothing_behind_on_a_corrupt_file_midway(tmp_path, records):
    """The first source is fine and written; the second breaks mid-stream: no data/raw, one error line."""
    project = make_project(
        tmp_path / "p", {"corpus": {"sources": ["inputs/a.jsonl.gz", "inputs/b.jsonl.gz"]}}
    )
    write_jsonl(project / "inputs/a.jsonl.gz", records)
    (project / "inputs/b.jsonl.gz").write_bytes(
        gzip.compress(("".join(json.dumps(r) + "\n" for r in records * 50)).encode())[:-30]
    )
    out = run_download(project)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("error: corpus.sources[1] (inputs/b.jsonl.gz): not a valid gzip file")
    assert not (project / "data" / "raw").exists() and not [p for p in (project / "data").iterdir()]


@pytest.mark.parametrize("file", ["corpus.txt", "sft.json"])
def test_download_stage_on_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, file):
    """The disk fills while data/raw/corpus.txt is written (OSError 28 at its file's write) or while sft.json is
    copied (at the copy's lowest write, os.sendfile): one line naming the output file (not its temp path, nor the
    copy's source), no data/raw."""
    import errno
    import os

    from stages import download

    project = make_project(tmp_path / "p")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_open = Path.open

    def opened(self, *args, **kwargs):
        out = real_open(self, *args, **kwargs)
        if self.name == "corpus.txt" and "w" in (args[0] if args else kwargs.get("mode", "r")):
            out.write = full  # the file the stage writes corpus.txt through
        return out

    monkeypatch.chdir(project)
    if file == "sft.json":
        monkeypatch.setattr(os, "sendfile", full)
    else:
        monkeypatch.setattr(Path, "open", opened)
    with pytest.raises(SystemExit) as info:
        download.main()
    assert info.value.code == 1
    assert capsys.readouterr().err == (
        f"error: data/raw/{file}: no space left on device (errno 28: free some space, then rerun)\n"
    )
    assert not (project / "data" / "raw").exists() and not [p for p in (project / "data").iterdir()]


REVISION = "0123456789abcdef0123456789abcdef01234567"


def test_hugging_face_dataset_file_from_a_prefilled_cache_offline(tmp_path, records):
    """hf://datasets/<repo>/<path> at a pinned commit, read through huggingface_hub's cache with HF_HUB_OFFLINE=1."""
    hub = tmp_path / "hf-cache"
    snapshot = hub / "datasets--someone--spanish-web" / "snapshots" / REVISION / "data"
    snapshot.mkdir(parents=True)
    write_parquet(snapshot / "train-00000.parquet", records)
    location = "hf://datasets/someone/spanish-web/data/train-00000.parquet"
    project = make_project(tmp_path / "p", {"corpus": {"sources": [{"url": location, "revision": REVISION}]}})
    out = run_download(project, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stderr
    manifest = json.loads((project / "data/raw/manifest.json").read_text())
    assert (
        manifest["sources"][0]["records_kept"] == len(records)
        and manifest["sources"][0]["source"] == location
    )
    assert (project / "data/raw/corpus.txt").read_text() == "".join(r["text"] + "\n" for r in records)

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["corpus"]["sources"] = [{"url": location.replace("train", "test"), "revision": REVISION}]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = run_download(project, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(
        f"error: corpus.sources[0]: {location.replace('train', 'test')}@{REVISION}: "
    )


def test_hf_sources_need_a_revision_and_a_dataset_path(tmp_path):
    with pytest.raises(
        PipelineError, match=r"corpus.sources\[0\].revision is required for hf://datasets/a/b/c.parquet"
    ):
        parse_params({"corpus": {"sources": [{"url": "hf://datasets/a/b/c.parquet"}]}})
    with pytest.raises(
        PipelineError, match=r"hf://models/a/b/c: expected hf://datasets/<owner>/<name>/<path"
    ):
        corpus_of(tmp_path, [{"url": "hf://models/a/b/c", "revision": REVISION}])


@pytest.mark.integration  # stage processes up to evaluate
def test_pipeline_from_jsonl_gz_and_parquet_sources_through_evaluate(tmp_path, records):
    """A corpus given as dataset shards runs end to end: download, tokenize, pretrain, evaluate (tiny params)."""
    more = records * 12  # ~60 kB of text: enough for the tiny model's windows in both splits
    project = make_project(
        tmp_path / "p",
        {
            "corpus": {
                "sources": [
                    "inputs/web-0000.jsonl.gz",
                    {"path": "inputs/web-0001.parquet", "where": {"lang": "es"}},
                ]
            }
        },
    )
    write_jsonl(project / "inputs/web-0000.jsonl.gz", more[: len(more) // 2])
    write_parquet(project / "inputs/web-0001.parquet", more[len(more) // 2 :], row_group_size=100)
    env = {**venv_env(), "PYTHONPATH": str(project)}
    out = subprocess.run(
        ["dvc", "repro", "evaluate"], cwd=project, capture_output=True, text=True, timeout=900, env=env
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = json.loads((project / "data/raw/manifest.json").read_text())
    jsonl, parquet = manifest["sources"]
    assert jsonl["records_kept"] == len(more) // 2 and parquet["records_read"] == len(more) // 2
    assert parquet["skipped"] == {
        "where lang != 'es'": sum(r["lang"] != "es" for r in more[len(more) // 2 :])
    }
    shards = json.loads((project / "data/shards/manifest.json").read_text())
    assert (
        shards["splits"]["train"]["documents"] + shards["splits"]["val"]["documents"]
        == manifest["files"]["documents.bin"]["documents"] + 1
    )  # one record is cut in two by the train/val split
    metrics = json.loads((project / "reports/evaluate/metrics.json").read_text())
    assert 0 < metrics["bits_per_byte"] < 8 and math.isfinite(metrics["val_loss"])


BAD_SOURCE_PARAMS = {
    "unknown key": (
        {"path": "x", "frmat": "csv"},
        r"unknown key 'corpus.sources\[0\].frmat' \(known: bad_records, format",
    ),
    "where not a mapping": (
        {"path": "x", "where": "lang=es"},
        r"corpus.sources\[0\].where must map field names to values",
    ),
    "negative min_chars": (
        {"path": "x", "min_chars": -1},
        r"corpus.sources\[0\].min_chars must be >= 0, got -1",
    ),
    "unknown format": (
        {"path": "x", "format": "xml"},
        r"corpus.sources\[0\].format must be one of 'text', 'jsonl'",
    ),
    "unknown bad_records": (
        {"path": "x", "bad_records": "drop"},
        r"corpus.sources\[0\].bad_records must be one of",
    ),
    "text_field not a string": (
        {"path": "x", "text_field": 3},
        r"corpus.sources\[0\].text_field must be a string",
    ),
}


@pytest.mark.parametrize("case", BAD_SOURCE_PARAMS)
def test_source_options_are_checked_in_params(case):
    source, message = BAD_SOURCE_PARAMS[case]
    with pytest.raises(PipelineError, match=r"^params.yaml: " + message):
        parse_params({"corpus": {"sources": [source]}})


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """The Hub's file endpoint: HEAD and GET /datasets/<repo>/resolve/<revision>/<path>, 404 for anything else."""

    files: dict[str, bytes] = {}
    hits: list[str] = []

    def _answer(self) -> bytes | None:
        self.hits.append(f"{self.command} {self.path}")
        data = self.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_response(200)
        self.send_header("X-Repo-Commit", REVISION)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return data

    def do_HEAD(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        if (data := self._answer()) is not None:
            self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.integration  # an HTTP server
def test_hugging_face_file_downloaded_from_a_loopback_hub_then_read_offline(tmp_path, records):
    """hf_hub_download against a local HF_ENDPOINT fills the cache; offline, the next run reads it from there."""
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    _HubHandler.files = {f"/datasets/someone/web/resolve/{REVISION}/data/part-0.jsonl.gz": data}
    _HubHandler.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    location = "hf://datasets/someone/web/data/part-0.jsonl.gz"
    project = make_project(tmp_path / "p", {"corpus": {"sources": [{"url": location, "revision": REVISION}]}})
    hub = {"HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        out = run_download(project, HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", **hub)
        assert out.returncode == 0, out.stderr
        assert any(hit.startswith("GET ") for hit in _HubHandler.hits)
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["corpus"]["sources"].append(
            {"url": location.replace("part-0", "part-1"), "revision": REVISION}
        )
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        out = run_download(project, HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", **hub)
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith(
            f"error: corpus.sources[1]: {location.replace('part-0', 'part-1')}@{REVISION}: "
        )
        assert "404" in out.stderr
    finally:
        server.shutdown()
        server.server_close()
    params["corpus"]["sources"].pop()
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = run_download(project, HF_HUB_OFFLINE="1", **hub)  # the server is gone: the cache answers
    assert out.returncode == 0, out.stderr
    assert (project / "data/raw/corpus.txt").read_text() == "".join(r["text"] + "\n" for r in records)
