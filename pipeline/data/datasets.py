"""Dataset files as documents: JSONL, JSON list, CSV/TSV and Parquet records, one document per record, streamed.

Compression (``.gz``, ``.zst``, ``.zip`` with a member) is undone on the fly; JSONL and CSV are read one line or row
at a time and Parquet one batch of a row group at a time, so memory stays flat whatever the file's size. A JSON
list is parsed whole (JSON cannot be streamed): give large data as JSONL. Every error names the source, the file
and the record (1-based: the line of a JSONL file, the row of a CSV or Parquet file, the item of a JSON list).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.common.config import CorpusSource
from pipeline.common.errors import PipelineError

RECORD_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zip": "zip"}
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}
PARQUET_BATCH_ROWS = 2048


def detect(name: str, member: str | None = None) -> tuple[str, str | None]:
    """``(format, compression)`` from a file name (a zip's from its member's name); unknown extensions are text."""
    path = Path(name)
    compression = COMPRESSIONS.get(path.suffix.lower())
    if compression == "zip":
        path = Path(member or "")
    elif compression:
        path = path.with_suffix("")
    return _EXTENSIONS.get(path.suffix.lower(), "text"), compression


class _ZstdReader(io.RawIOBase):
    """A zstd file's bytes, decompressed frame after frame (a file of concatenated frames reads as one stream).

    zstandard's own ``stream_reader`` neither reads lines nor notices a file cut inside a frame (it just stops):
    here a truncated file is an EOFError, and ``io.BufferedReader`` on top gives lines.
    """

    def __init__(self, raw: IO[bytes]):
        import zstandard

        self._raw, self._new = raw, zstandard.ZstdDecompressor().decompressobj
        self._frame, self._in_frame = self._new(), False
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out):
            if self._frame.eof:  # a frame ended: what follows it starts the next one
                rest, self._frame, self._in_frame = self._frame.unused_data, self._new(), False
                if rest:
                    self._out, self._at, self._in_frame = self._frame.decompress(rest), 0, True
                    continue
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            self._out, self._at, self._in_frame = self._frame.decompress(chunk), 0, True
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = memoryview(self._out)[self._at : self._at + n]
        self._at += n
        return n

    def readall(self) -> bytes:  # a whole text file: in big pieces, not io's 8 kB ones
        parts = []
        while part := self.read(1 << 22):
            parts.append(part)
        return b"".join(parts)


def _corrupt_data_errors() -> tuple[type[BaseException], ...]:
    """What reading a broken compressed file raises: truncated, not the format its suffix says, bad checksums."""
    errors: list[type[BaseException]] = [gzip.BadGzipFile, EOFError, zlib.error, zipfile.BadZipFile]
    if "zstandard" in sys.modules:
        errors.append(sys.modules["zstandard"].ZstdError)
    return tuple(errors)


@contextmanager
def open_stream(path: Path, compression: str | None, member: str | None, where: str) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed as they are read; broken compressed data is one error naming ``where``."""
    if compression is None:
        with path.open("rb") as stream:
            yield stream
        return
    try:
        with _decompressed(path, compression, member, where) as stream:
            yield stream
    except _corrupt_data_errors() as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise PipelineError(f"{where}: not a valid {compression} file ({reason})") from None


@contextmanager
def _decompressed(path: Path, compression: str, member: str | None, where: str) -> Iterator[IO[bytes]]:
    if compression == "zip":
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as exc:
            raise PipelineError(f"{where}: not a zip archive ({exc})") from None
        with archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]  # files, not directory entries
            if member is None and len(names) == 1:
                member = names[0]
            if member is None or member not in names:
                wanted = "give `member:`" if member is None else f"no member {member!r}"
                raise PipelineError(
                    f"{where}: {wanted} (the archive holds: {', '.join(names[:10]) or 'nothing'})"
                )
            with archive.open(member) as stream:
                yield stream
    elif compression == "gzip":
        with gzip.open(path, "rb") as stream:
            yield stream
    else:  # zstd
        with path.open("rb") as raw, io.BufferedReader(_ZstdReader(raw), 1 << 20) as stream:
            yield stream


def _jsonl(stream: IO[bytes], where: str) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(stream, 1):
        if line.strip():
            try:
                yield number, json.loads(line)  # bytes: json decodes the UTF-8 itself
            except UnicodeDecodeError as exc:
                raise PipelineError(
                    f"{where}: record {number}: not valid UTF-8 at byte {exc.start} of the line"
                ) from None
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{where}: record {number}: not valid JSON ({exc})") from None


def _json_list(stream: IO[bytes], where: str) -> Iterator[tuple[int, Any]]:
    try:
        records = json.loads(stream.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise PipelineError(f"{where}: expected a JSON list of records, got a {type(records).__name__}")
    yield from enumerate(records, 1)


def csv_rows(
    text: IO[str],
    where: str,
    delimiter: str,
    fieldnames: Sequence[str] | None = None,
    quoting: int = csv.QUOTE_MINIMAL,
) -> Iterator[tuple[int, dict]]:
    """``(row number, row)`` of a CSV/TSV text, parsed strictly: a quote never closed (which would swallow the rest
    of the file into one field) or a row with more fields than the header is an error naming its line."""
    csv.field_size_limit(1 << 30)  # a document may be far longer than csv's 128 kB default
    reader = csv.DictReader(text, fieldnames=fieldnames, delimiter=delimiter, quoting=quoting, strict=True)
    start = 1
    try:
        header = reader.fieldnames or []
        start = reader.line_num + 1
        for number, row in enumerate(reader, 1):
            if None in row:  # DictReader's restkey: the fields past the header's
                raise PipelineError(
                    f"{where}: line {start}: {len(header) + len(row[None])} fields, the header has "
                    f"{len(header)} (quote a field that holds {delimiter!r})"
                )
            yield number, row
            start = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{where}: not valid UTF-8 ({exc})") from None
    except csv.Error as exc:
        unclosed = "unexpected end of data" in str(exc)
        what = "a quoted field is never closed" if unclosed else "not valid CSV"
        raise PipelineError(f"{where}: line {start}: {what} ({exc})") from None


def _csv(stream: IO[bytes], where: str, delimiter: str) -> Iterator[tuple[int, Any]]:
    return csv_rows(io.TextIOWrapper(stream, encoding="utf-8", newline=""), where, delimiter)


def _parquet(stream: IO[bytes], where: str, columns: list[str]) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:  # read as it goes (no pre-buffered row group), on this thread: less peak memory per parse process (BENCHMARKS.md)
        parquet = pq.ParquetFile(stream, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PipelineError(f"{where}: not a Parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    if columns[0] not in names:
        raise PipelineError(
            f"{where}: no column {columns[0]!r} (columns: {', '.join(names)}); set text_field"
        )
    wanted = [
        c for c in dict.fromkeys(columns) if c in names
    ]  # each once, in order; a missing filter column reads as None
    number = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted, use_threads=False):
        values = [batch.column(i).to_pylist() for i in range(len(wanted))]
        for row in zip(*values, strict=True):  # columns → rows
            number += 1
            yield number, dict(zip(wanted, row, strict=True))


def iter_records(stream: IO[bytes], fmt: str, where: str, columns: list[str]) -> Iterator[tuple[int, Any]]:
    """``(record number, record)`` of a dataset file; ``columns`` (text field first) limits what Parquet reads."""
    if fmt == "jsonl":
        return _jsonl(stream, where)
    if fmt == "json":
        return _json_list(stream, where)
    if fmt in ("csv", "tsv"):
        return _csv(stream, where, "," if fmt == "csv" else "\t")
    if fmt == "parquet":
        return _parquet(stream, where, columns)
    raise PipelineError(f"{where}: format {fmt!r} has no records (one of {', '.join(RECORD_FORMATS)})")


@dataclass
class RecordCounts:
    """What the manifest says of a dataset source: records read, kept, skipped (by reason)."""

    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "records_read": self.read,
            "records_kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
        }


def record_texts(
    source: CorpusSource,
    path: Path,
    fmt: str,
    compression: str | None,
    where: str,
    counts: RecordCounts,
    clean: Callable[[str], str],
) -> Iterator[str]:
    """The ``clean``ed text of every record that passes the source's filter; the rest are counted in ``counts``.

    A record without the text field, or whose text is not a string, is an error naming it, unless
    ``bad_records: skip``.
    """
    field_name = source.text_field
    columns = [field_name, *(name for name, _ in source.where)]
    with open_stream(path, compression, source.member, where) as stream:
        for number, record in iter_records(stream, fmt, where, columns):
            counts.read += 1
            if not isinstance(record, dict):
                problem = f"not an object but a {type(record).__name__}"
            elif field_name not in record:
                problem = f"no field {field_name!r}"
            elif not isinstance(record[field_name], str):
                problem = f"field {field_name!r} is a {type(record[field_name]).__name__}, not a string"
            else:
                problem = None
            if problem:
                if source.bad_records == "error":
                    fields = f" (fields: {', '.join(map(str, record))})" if isinstance(record, dict) else ""
                    raise PipelineError(
                        f"{where}: record {number}: {problem}{fields}; set text_field, or bad_records: skip"
                    )
                counts.skipped[problem] += 1
                continue
            text = record[field_name]
            mismatch = next(
                (f"{name} != {value!r}" for name, value in source.where if record.get(name) != value),
                None,
            )
            if mismatch:
                counts.skipped[f"where {mismatch}"] += 1
            elif len(text.strip()) < source.min_chars:
                counts.skipped[f"shorter than min_chars={source.min_chars}"] += 1
            elif not (text := clean(text)).strip():
                counts.skipped["empty"] += 1
            else:
                counts.kept += 1
                yield text
