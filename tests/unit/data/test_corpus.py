"""Corpus sources, cleaning (Gutenberg, BOM/CRLF/NFC), the content-addressed cache and `pipeline cache`."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest

from pipeline.cli import main as cli_main
from pipeline.common.config import CorpusSource, Source, resolve_cache_dir
from pipeline.common.errors import PipelineError
from pipeline.data.corpus import (
    DownloadCache,
    build_corpus,
    clean_text,
    copy_json_source,
    read_raw,
    source_files,
    strip_gutenberg,
)
from tests.helpers.project import generated_corpus

GUTENBERG = (
    "\ufeffThe Project Gutenberg eBook of Test\r\nLicence blah\r\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK TEST ***\r\n\r\nCafe\u0301 con leche.\r\nSegunda línea.\r\n\r\n"
    "*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\r\nMore licence\r\n"
)


def test_gutenberg_and_normalisation():
    text = clean_text(GUTENBERG.encode(), "t", gutenberg=True, normalise=True)
    assert text == "Café con leche.\nSegunda línea.\n"
    assert "\u0301" not in text  # NFC: e + combining accent became é
    raw = clean_text(GUTENBERG.encode(), "t", gutenberg=False, normalise=False)
    assert raw == GUTENBERG
    body = clean_text(GUTENBERG.encode(), "t", gutenberg=True, normalise=False)
    assert body.startswith("\r\nCafe\u0301") and "Licence" not in body and "More licence" not in body
    assert strip_gutenberg("no markers\n") == "no markers\n"


def test_a_whole_gutenberg_book_is_stripped(shared_data):
    """Quijote as Project Gutenberg serves it (BOM, CRLF, licence) when present, else a generated book so wrapped."""
    if shared_data is not None:
        raw, first_line = (
            (shared_data / "quijote.txt").read_bytes(),
            "El ingenioso hidalgo don Quijote de la Mancha",
        )
    else:
        body = generated_corpus(50_000)
        raw = GUTENBERG.replace(
            "Cafe\u0301 con leche.\r\nSegunda línea.", body.replace("\n", "\r\n")
        ).encode()
        first_line = body.splitlines()[0]
    text = clean_text(raw, "quijote", gutenberg=True, normalise=True)
    assert text.splitlines()[0] == first_line
    assert "Gutenberg" not in text and "\r" not in text and not text.startswith("\ufeff")
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_bad_text_names_its_origin():
    with pytest.raises(PipelineError, match=r"corpus.sources\[0\] \(x.txt\): not valid UTF-8 at byte 3"):
        clean_text(b"abc\xff\xfe", "corpus.sources[0] (x.txt)", gutenberg=True, normalise=True)
    with pytest.raises(PipelineError, match="no text"):
        clean_text(b" \r\n\n", "empty.txt", gutenberg=True, normalise=True)


def test_sources_files_directories_and_pins(tmp_path):
    cache = DownloadCache(tmp_path / "cache")
    books = tmp_path / "books"
    (books / "b").mkdir(parents=True)
    (books / "b" / "two.txt").write_text("dos\n")
    (books / "a.txt").write_text("uno\n")
    (books / ".hidden").write_text("no\n")
    assert [label for label, _ in source_files(Source(str(books)), cache, "s")] == [
        str(books / "a.txt"),
        str(books / "b" / "two.txt"),
    ]
    good = hashlib.sha256(b"uno\n").hexdigest()
    assert source_files(Source(str(books / "a.txt"), good), cache, "s")[0][1] == books / "a.txt"
    with pytest.raises(PipelineError, match=r"corpus.sources\[2\]: .*a.txt: sha256 mismatch"):
        source_files(Source(str(books / "a.txt"), "0" * 64), cache, "corpus.sources[2]")
    with pytest.raises(PipelineError, match="sft.data: missing.json: no such file"):
        source_files(Source("missing.json"), cache, "sft.data")
    with pytest.raises(PipelineError, match="is a directory"):
        source_files(Source(str(books), good), cache, "s")
    with pytest.raises(PipelineError, match="no source given"):
        source_files(Source(""), cache, "dpo.data")


def test_build_corpus_and_read_raw(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfuno\r\ndos\r\n")
    (tmp_path / "b.txt").write_text("tres\n")
    raw = tmp_path / "raw"
    raw.mkdir()
    table = build_corpus(
        (CorpusSource(str(tmp_path / "a.txt")), CorpusSource(str(tmp_path / "b.txt"))),
        DownloadCache(tmp_path / "cache"),
        raw,
        gutenberg=True,
        normalise=True,
    )
    assert (raw / "corpus.txt").read_bytes() == b"uno\ndos\ntres\n"
    assert [(t["documents"], t["bytes"]) for t in table] == [(1, 8), (1, 5)]
    assert table[0]["files"][0]["sha256"] == hashlib.sha256(b"\xef\xbb\xbfuno\r\ndos\r\n").hexdigest()
    manifest = {"files": {"corpus.txt": {"bytes": 13}, "documents.bin": {"documents": 2}}, "sources": table}
    (raw / "manifest.json").write_text(json.dumps(manifest))
    path, segments = read_raw(raw)
    assert path == raw / "corpus.txt" and [(s.offset, s.length) for s in segments] == [(0, 8), (8, 5)]
    (raw / "corpus.txt").write_bytes(b"uno\n")
    with pytest.raises(PipelineError, match="corpus.txt: 4 bytes, the manifest says 13"):
        read_raw(raw)
    (raw / "documents.bin").write_bytes(b"\0" * 9)
    with pytest.raises(PipelineError, match="documents.bin: 9 bytes, the manifest says 2 documents"):
        read_raw(raw)
    with pytest.raises(PipelineError, match="corpus.sources: empty"):
        build_corpus((), DownloadCache(tmp_path / "cache"), raw, gutenberg=True, normalise=True)


def test_json_sources_are_copied_verbatim_and_checked(tmp_path):
    cache = DownloadCache(tmp_path / "cache")
    data = b'[{"instruction": "Di hola", "input": "", "output": "Hola"}]  \n'
    (tmp_path / "sft.json").write_bytes(data)
    entry = copy_json_source(Source(str(tmp_path / "sft.json")), cache, "sft.data", tmp_path / "out.json")
    assert (tmp_path / "out.json").read_bytes() == data
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["records"] == 1
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PipelineError, match="dpo.data: .*bad.json: not valid JSON"):
        copy_json_source(Source(str(tmp_path / "bad.json")), cache, "dpo.data", tmp_path / "o.json")


def test_cache_is_content_addressed_and_drops_corrupt_entries(tmp_path):
    cache = DownloadCache(tmp_path / "cache")
    (tmp_path / "f.txt").write_bytes(b"hola")
    stored = cache.add_file(tmp_path / "f.txt")
    sha = hashlib.sha256(b"hola").hexdigest()
    assert stored == cache.object_path(sha) and stored.read_bytes() == b"hola"
    assert cache.lookup(sha) == stored
    assert not list((tmp_path / "cache" / "tmp").iterdir())
    stored.write_bytes(b"hola!")
    assert cache.lookup(sha) is None and not stored.exists()


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_PIPELINE_CACHE", str(tmp_path / "env"))
    assert str(resolve_cache_dir("custom")) == "custom"  # data.cache_dir wins over the environment
    assert resolve_cache_dir("~/c") == Path.home() / "c"
    assert resolve_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("LLM_PIPELINE_CACHE")
    assert str(resolve_cache_dir(None)).endswith(".cache/llm-pipeline")


def test_cache_cli_add_and_list(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "book.txt").write_bytes(b"libro")
    assert cli_main(["cache", "--cache-dir", "c", "add", "book.txt"]) == 0
    sha = hashlib.sha256(b"libro").hexdigest()
    assert f"{sha}  book.txt" in capsys.readouterr().out
    assert cli_main(["cache", "--cache-dir", "c", "list"]) == 0
    listing = capsys.readouterr().out
    assert sha in listing and str(tmp_path / "book.txt") in listing
    assert cli_main(["cache", "--cache-dir", "c", "add", "nope.txt"]) == 1
    assert "nope.txt: file not found" in capsys.readouterr().err


def test_cache_cli_with_a_file_for_a_cache_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "book.txt").write_bytes(b"libro")
    (tmp_path / "afile").write_text("not a directory")
    assert cli_main(["cache", "--cache-dir", "afile", "add", "book.txt"]) == 1
    assert capsys.readouterr().err == (
        "error: --cache-dir: afile is not a directory (the cache is a directory of files)\n"
    )
    assert cli_main(["cache", "--cache-dir", "afile/sub", "add", "book.txt"]) == 1
    assert capsys.readouterr().err.startswith("error: afile/sub: cannot be the download cache (")
    assert (tmp_path / "afile").read_text() == "not a directory"


def test_cache_write_on_a_full_disk_is_one_line_and_leaves_no_entry(tmp_path, monkeypatch, capsys):
    """The disk fills while a file is stored (OSError 28 at the file's write): one line, no temp file, no entry."""
    import os

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.file = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.chdir(tmp_path)
    (tmp_path / "book.txt").write_bytes(b"libro")
    monkeypatch.setattr(os, "fdopen", Full)
    assert cli_main(["cache", "--cache-dir", "c", "add", "book.txt"]) == 1
    assert capsys.readouterr().err == (
        "error: c: no space left on device (errno 28: free some space, then rerun) "
        f"(storing {tmp_path / 'book.txt'})\n"
    )
    assert not list((tmp_path / "c" / "tmp").iterdir()) and not (tmp_path / "c" / "sha256").exists()


def test_jsonl_instruction_data_is_accepted_and_stored_as_a_json_list(tmp_path):
    from pipeline.common.config import Source
    from pipeline.data.corpus import DownloadCache, copy_json_source

    records = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(3)]
    source = tmp_path / "sft.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    out = tmp_path / "sft.json"
    info = copy_json_source(Source(str(source)), DownloadCache(tmp_path / "cache"), "sft.data", out)
    assert info["format"] == "jsonl" and info["records"] == 3
    assert json.loads(out.read_text(encoding="utf-8")) == records
    source.write_text(json.dumps(records[0]) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(PipelineError, match="sft.data: .*line 2 is not valid JSON"):
        copy_json_source(Source(str(source)), DownloadCache(tmp_path / "cache"), "sft.data", out)
