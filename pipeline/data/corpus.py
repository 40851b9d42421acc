"""Corpus sources, the content-addressed download cache, and text cleaning (the download stage's core).

A source is a URL (http/https), a local file, a directory, a glob or an ``hf://datasets/...`` file, optionally
pinned by sha256; a text file is one document, a dataset file one per record (pipeline/data/datasets.py). Downloads land in
a cache keyed by their sha256 (``<cache>/sha256/<hex>``): a pinned source that is already cached is never
fetched again, which is also how an offline machine works (``python -m pipeline cache add FILE``).
"""

from __future__ import annotations

import argparse
import array
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from tqdm import tqdm

from pipeline.common.config import CACHE_ENV, CorpusSource, DataParams, Source, load_params, resolve_cache_dir
from pipeline.common.errors import DISK_FULL, PipelineError, disk_full
from pipeline.common.hashing import CHUNK, sha256_file
from pipeline.data.datasets import RecordCounts, detect, open_stream, record_texts
from pipeline.data.textstream import CHUNK_DOCUMENTS, DocumentTable
from pipeline.data.unwrap import unwrap as unwrap_lines

CORPUS, DOCUMENTS = "corpus.txt", "documents.bin"

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK[^\n]*\n", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK", re.M | re.I)


class _Transient(Exception):
    """A failure worth retrying (connection refused or dropped, timeout, 5xx)."""


@dataclass
class DownloadCache:
    """Files stored by their sha256; every write is a temp file renamed into place after verification."""

    root: Path
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.5

    @classmethod
    def from_params(cls, data: DataParams) -> DownloadCache:
        root = resolve_cache_dir(data.cache_dir)
        if root.exists() and not root.is_dir():
            raise PipelineError(
                f"data.cache_dir: {root} is not a directory (set data.cache_dir or ${CACHE_ENV} to one)"
            )
        return cls(root, data.timeout_s, data.retries)

    def object_path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256

    def lookup(self, sha256: str) -> Path | None:
        """The cached file with this hash; a corrupt entry is dropped (and will be fetched again)."""
        path = self.object_path(sha256)
        if not path.is_file():
            return None
        if sha256_file(path) != sha256:
            path.unlink()
            return None
        return path

    def add_file(self, path: str | Path) -> Path:
        """Store a local file under its sha256 (so a URL pinned to that hash resolves offline)."""
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"{path}: file not found")
        with path.open("rb") as src:
            return self._store(iter(lambda: src.read(CHUNK), b""), str(path.resolve()))

    def fetch(self, url: str, sha256: str | None = None, where: str = "source") -> Path:
        """The file at ``url``: from the cache when pinned and present, else downloaded with retries and backoff."""
        if sha256 and (hit := self.lookup(sha256)):
            return hit
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))  # exponential backoff
            try:
                return self._download(url, sha256, where)
            except _Transient as exc:
                error = exc
        raise PipelineError(f"{where}: {url}: download failed after {self.retries + 1} attempts ({error})")

    def entries(self) -> Iterator[tuple[str, int, list[str]]]:
        """(sha256, bytes, origins seen) for every cached file."""
        origins: dict[str, list[str]] = {}
        index = self.root / "sources.tsv"
        if index.is_file():
            for line in index.read_text(encoding="utf-8").splitlines():
                sha, _, origin = line.partition("\t")
                origins.setdefault(sha, []).append(origin)
        objects = self.root / "sha256"
        for path in sorted(objects.iterdir()) if objects.is_dir() else []:
            yield path.name, path.stat().st_size, sorted(set(origins.get(path.name, [])))

    def _download(self, url: str, sha256: str | None, where: str) -> Path:
        import requests

        try:
            connect_and_read = (self.timeout_s, self.timeout_s)
            with requests.get(url, stream=True, timeout=connect_and_read) as resp:
                # Server trouble, timeout, rate limit: retry
                if resp.status_code >= 500 or resp.status_code in (
                    408,
                    429,
                ):
                    raise _Transient(f"HTTP {resp.status_code}")
                if resp.status_code >= 400:
                    raise PipelineError(f"{where}: {url}: HTTP {resp.status_code} {resp.reason}")
                path = self._store(self._body(resp, url), url)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        except requests.RequestException as exc:
            raise PipelineError(f"{where}: {url}: {type(exc).__name__}: {exc}") from None
        if sha256 and path.name != sha256:
            raise PipelineError(
                f"{where}: {url}: sha256 mismatch: expected {sha256}, got {path.name} "
                "(the file changed upstream, or the pin is wrong)"
            )
        return path

    @staticmethod
    def _body(resp, url: str) -> Iterator[bytes]:
        """The response's bytes with a progress bar; a body shorter than Content-Length is a dropped connection."""
        total = int(resp.headers.get("Content-Length", 0)) or None
        received = 0
        name = Path(urlparse(url).path).name or url
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, leave=False) as bar:
            for chunk in resp.iter_content(CHUNK):
                received += len(chunk)
                bar.update(len(chunk))
                yield chunk
        # compressed: Content-Length counts the bytes on the wire, received the decoded ones
        if total and "Content-Encoding" not in resp.headers and received != total:
            raise _Transient(f"connection dropped after {received} of {total} bytes")

    def _store(self, chunks: Iterator[bytes], origin: str) -> Path:
        """Write ``chunks`` to a temp file, then rename it to its sha256: readers never see a partial entry."""
        try:
            (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:  # a file where the cache needs a directory
            raise PipelineError(
                f"{self.root}: cannot be the download cache ({exc.strerror}: {exc.filename})"
            ) from None
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
            target = self.object_path(digest.hexdigest())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)  # atomic: the entry appears whole or not at all
        except OSError as exc:
            if (message := disk_full(OSError(exc.errno, exc.strerror, str(self.root)))) is None:
                raise
            raise PipelineError(f"{message} (storing {origin})") from None
        finally:
            Path(tmp).unlink(missing_ok=True)  # a failed write leaves no temp file behind
        # Where each hash came from (cache list)
        with (self.root / "sources.tsv").open("a", encoding="utf-8") as index:
            index.write(f"{target.name}\t{origin}\n")
        return target


def is_url(location: str) -> bool:
    return urlparse(location).scheme in ("http", "https")


def hf_file(location: str, revision: str | None, where: str) -> Path:
    """``hf://datasets/<owner>/<name>/<path>`` at a pinned revision, through huggingface_hub's cache.

    With ``HF_HUB_OFFLINE=1`` (or no network) a file already in the cache (``HF_HUB_CACHE``) is used as it is.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    kind, _, rest = location.removeprefix("hf://").partition("/")
    parts = rest.split("/", 2)
    if kind != "datasets" or len(parts) < 3 or not all(parts):
        raise PipelineError(
            f"{where}: {location}: expected hf://datasets/<owner>/<name>/<path in the dataset>"
        )
    if not revision:
        raise PipelineError(f"{where}: {location}: give the revision (a commit) to read")
    try:
        return Path(
            hf_hub_download(f"{parts[0]}/{parts[1]}", parts[2], repo_type="dataset", revision=revision)
        )
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PipelineError(f"{where}: {location}@{revision}: {type(exc).__name__}: {reason}") from None


def source_files(source: Source, cache: DownloadCache, where: str) -> list[tuple[str, Path]]:
    """``(label, local path)`` of each file a source stands for; a directory or a glob gives its files in name order."""
    if not source.location:
        raise PipelineError(f"{where}: no source given (a URL, a file or a directory)")
    if is_url(source.location):
        return [(source.location, cache.fetch(source.location, source.sha256, where))]
    if source.location.startswith("hf://"):
        path = hf_file(source.location, getattr(source, "revision", None), where)
        if source.sha256 and (actual := sha256_file(path)) != source.sha256:
            raise PipelineError(
                f"{where}: {source.location}: sha256 mismatch: expected {source.sha256}, got {actual}"
            )
        return [(source.location, path)]
    if "://" in source.location:  # not http(s):// nor hf:// (handled above)
        scheme = urlparse(source.location).scheme
        hint = (
            f" (for a local file give its path: {urlparse(source.location).path})" if scheme == "file" else ""
        )
        raise PipelineError(
            f"{where}: {source.location}: unsupported URL scheme '{scheme}://'; a source is an http(s):// URL, "
            f"an hf://datasets/... file, or a local path{hint}"
        )
    path = Path(source.location).expanduser()
    if glob.has_magic(source.location):
        if source.sha256:
            raise PipelineError(f"{where}: sha256 pins a single file, but {source.location} is a glob")
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise PipelineError(f"{where}: {source.location}: no file matches")
        return [(str(p), p) for p in files]
    if path.is_dir():
        if source.sha256:
            raise PipelineError(f"{where}: sha256 pins a single file, but {path} is a directory")
        files = sorted(  # hidden files and directories (.git, .DS_Store) are skipped
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise PipelineError(f"{where}: directory {path} has no files")
        return [(str(p), p) for p in files]
    if path.exists() and not path.is_file():
        raise PipelineError(
            f"{where}: {source.location}: not a regular file (a device, pipe or socket); give a file or a directory"
        )
    if not path.is_file():
        raise PipelineError(f"{where}: {source.location}: no such file or directory")
    if source.sha256 and (actual := sha256_file(path)) != source.sha256:
        raise PipelineError(f"{where}: {path}: sha256 mismatch: expected {source.sha256}, got {actual}")
    return [(str(path), path)]


def strip_gutenberg(text: str) -> str:
    """The body between Project Gutenberg's START and END marker lines (licence header/footer removed)."""
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text, start.end() if start else 0)
    return text[start.end() if start else 0 : end.start() if end else len(text)]


def normalize(text: str) -> str:
    """No BOM, LF line ends, Unicode NFC, one final newline: the same text always gives the same bytes."""
    text = text.removeprefix("\ufeff")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # Windows line ends, then lone CRs
    text = unicodedata.normalize("NFC", text)
    if text.endswith("\n") and not text.endswith("\n\n") and not text.startswith("\n"):
        return text  # already in shape: no copy (most dataset records)
    return text.strip("\n") + "\n"


def clean_text(
    raw: bytes, origin: str, *, gutenberg: bool, normalise: bool, unwrap: bool | str = False
) -> str:
    """A text file's document: Gutenberg licence stripped, normalised, and unwrapped when ``unwrap`` is true, or is
    ``"gutenberg"`` and the file is a Project Gutenberg book (it has the START marker)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{origin}: not valid UTF-8 at byte {exc.start} (convert it to UTF-8)") from None
    is_book = (
        unwrap == "gutenberg" and _GUTENBERG_START.search(text) is not None
    )  # before strip_gutenberg drops the marker
    if gutenberg:
        text = strip_gutenberg(text)
    if normalise:
        text = normalize(text)
    if unwrap is True or is_book:
        text = unwrap_lines(text)
    if not text.strip():
        raise PipelineError(f"{origin}: no text (empty file, or nothing left after cleaning)")
    return text


def build_corpus(
    sources: tuple[CorpusSource, ...],
    cache: DownloadCache,
    directory: Path,
    *,
    gutenberg: bool,
    normalise: bool,
    unwrap: bool | str = False,
) -> list[dict]:
    """Write every source's clean documents into ``directory``: ``corpus.txt`` (one after another) and
    ``documents.bin`` (each document's end offset, little-endian uint64). Returns the per-source table.

    A text file is one document; a dataset file (JSONL, JSON, CSV/TSV, Parquet) gives one per kept record.
    """
    if not sources:
        raise PipelineError("corpus.sources: empty (give at least one URL, file or directory)")
    ends, offset, table = (
        array.array("Q"),
        0,
        [],
    )  # ends: uint64s, 8 bytes per document rather than a Python int each
    try:
        with (directory / CORPUS).open("wb", buffering=CHUNK) as out:
            for i, source in enumerate(sources):
                where = f"corpus.sources[{i}]"
                entry: dict = {"source": source.location, "files": [], "documents": 0, "bytes": 0}
                counts = RecordCounts()
                for label, path in source_files(source, cache, where):
                    fmt, compression = detect(label, source.member)
                    fmt = source.format or fmt
                    entry["files"].append(
                        {
                            "file": label,
                            "format": fmt,
                            "bytes": path.stat().st_size,
                            "sha256": sha256_file(path),
                        }
                    )
                    if fmt == "text":
                        with open_stream(path, compression, source.member, f"{where} ({label})") as stream:
                            raw = stream.read()
                        texts = [
                            clean_text(
                                raw,
                                f"{where} ({label})",
                                gutenberg=gutenberg,
                                normalise=normalise,
                                unwrap=unwrap,
                            )
                        ]
                    else:
                        texts = record_texts(
                            source,
                            path,
                            fmt,
                            compression,
                            f"{where} ({label})",
                            counts,
                            normalize if normalise else str,
                        )
                    for text in texts:
                        data = text.encode("utf-8")
                        out.write(data)
                        offset += len(data)
                        ends.append(offset)
                        entry["documents"] += 1
                        entry["bytes"] += len(data)
                if counts.read:
                    entry |= counts.as_dict()
                if not entry["documents"]:
                    skipped = (
                        ", ".join(f"{n} {reason}" for reason, n in counts.skipped.most_common()) or "none"
                    )
                    raise PipelineError(
                        f"{where}: {source.location}: no records kept (read {counts.read}; skipped: {skipped})"
                    )
                table.append(entry)
    except OSError as exc:  # a full disk: say which file (a write error names none)
        if exc.errno in DISK_FULL and exc.filename is None:
            exc.filename = str(directory / CORPUS)
        raise
    (directory / DOCUMENTS).write_bytes(np.asarray(ends, dtype="<u8").tobytes())
    return table


def _parse_records(raw: bytes, where: str, label: str) -> tuple[list, bool]:
    """Records from a JSON list or from JSONL (one object per line); returns (records, was_jsonl)."""
    try:
        return json.loads(raw), False
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{where}: {label}: not valid UTF-8 ({exc})") from None
    except json.JSONDecodeError as exc:
        lines = [(n, line) for n, line in enumerate(raw.decode("utf-8").splitlines(), 1) if line.strip()]
        if len(lines) < 2:  # a single line that does not parse is broken JSON, not JSONL
            raise PipelineError(f"{where}: {label}: not valid JSON ({exc})") from None
    records = []
    for number, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{where}: {label}: line {number} is not valid JSON ({exc})") from None
    return records, True


def copy_json_source(source: Source, cache: DownloadCache, where: str, out: Path) -> dict:
    """Copy a JSON or JSONL data file (SFT/DPO records) into ``out`` as a JSON list.

    A JSON list is copied byte for byte; JSONL is rewritten as the equivalent list, so later stages read one format.
    """
    files = source_files(source, cache, where)
    if len(files) != 1:
        raise PipelineError(
            f"{where}: {source.location} is a directory of {len(files)} files; give one JSON or JSONL "
            "file (records are not merged across files)"
        )
    [(label, path)] = files
    raw = path.read_bytes()
    records, was_jsonl = _parse_records(raw, where, label)
    if not isinstance(records, list) or not records:
        raise PipelineError(f"{where}: {label}: expected a non-empty JSON list (or JSONL) of records")
    if was_jsonl:
        out.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    else:
        shutil.copyfile(path, out)
    return {
        "source": label,
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "records": len(records),
        "format": "jsonl" if was_jsonl else "json",
    }


def read_raw(directory: str | Path) -> tuple[Path, DocumentTable]:
    """The download stage's corpus file and its documents' byte ranges (read from disk as needed), checked against
    the manifest."""
    directory = Path(directory)
    manifest_path, corpus, table = directory / "manifest.json", directory / CORPUS, directory / DOCUMENTS
    if not manifest_path.is_file():
        raise PipelineError(f"{manifest_path}: not found (run `dvc repro download`)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        expected = manifest["files"][CORPUS]["bytes"]
        count = manifest["files"][DOCUMENTS]["documents"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PipelineError(f"{manifest_path}: not a download manifest ({exc})") from None
    for path in (corpus, table):
        if not path.is_file():
            raise PipelineError(f"{path}: not found (run `dvc repro download`)")
    if table.stat().st_size != 8 * count:
        raise PipelineError(
            f"{table}: {table.stat().st_size} bytes, the manifest says {count} documents of 8 bytes"
        )
    # Ends rising from the first to the corpus's last byte, read a chunk at a time
    with table.open("rb") as f:
        last, rising = 0, True
        while rising and (ends := np.fromfile(f, dtype="<u8", count=CHUNK_DOCUMENTS).astype(np.int64)).size:
            rising, last = bool((np.diff(ends, prepend=last) > 0).all()), int(ends[-1])
    if corpus.stat().st_size != expected or last != expected or not rising:
        raise PipelineError(f"{corpus}: {corpus.stat().st_size} bytes, the manifest says {expected}")
    if expected == 0:
        raise PipelineError(f"{corpus}: empty corpus")
    return corpus, DocumentTable(table, count)


def cli_cache(argv: list[str]) -> int:
    """`python -m pipeline cache add FILE...` / `cache list`: seed and inspect the download cache."""
    parser = argparse.ArgumentParser(prog="python -m pipeline cache", description=cli_cache.__doc__)
    parser.add_argument(
        "--cache-dir", help="default: params.yaml data.cache_dir, $LLM_PIPELINE_CACHE, ~/.cache/llm-pipeline"
    )
    parser.add_argument(
        "--params", default="params.yaml", help="read data.cache_dir from this file when present"
    )
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser(
        "add", help="store local files under their sha256 (pinned URLs then resolve offline)"
    )
    add.add_argument("files", nargs="+", type=Path)
    sub.add_parser("list", help="list cached files: sha256, size, where they came from")
    args = parser.parse_args(argv)
    configured = args.cache_dir
    if configured is None and Path(args.params).is_file():
        configured = load_params(args.params).data.cache_dir
    root = resolve_cache_dir(configured)
    if root.exists() and not root.is_dir():
        where = "--cache-dir" if args.cache_dir is not None else f"{args.params}: data.cache_dir"
        raise PipelineError(f"{where}: {root} is not a directory (the cache is a directory of files)")
    cache = DownloadCache(root)
    if args.action == "add":
        for file in args.files:
            print(f"{cache.add_file(file).name}  {file}")
        print(f"cache: {cache.root}")
    else:
        for sha, size, origins in cache.entries():
            print(f"{sha}  {size:>12,d}  {', '.join(origins)}")
    return 0
