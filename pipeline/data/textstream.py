"""Read a large UTF-8 file in bounded blocks cut where no tokenizer's split pattern would join the two sides.

Every split pattern we use (GPT-2's, rustbpe's GPT-4-style one, and the char pattern) ends a piece between
a visible ASCII character and either a newline + visible character (``"x\\nY"`` cuts after the newline) or a
space + ASCII letter (``"x word"`` cuts before the space): no alternative matches across those points, and
none looks behind. Cutting only there makes block-by-block encoding give exactly the tokens of encoding
the whole text at once, while memory stays bounded by the block size. A block with no such point (one
enormous line of spaces or symbols) is cut at a character boundary, the one place where tokens may differ.
"""

from __future__ import annotations

import collections
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common.errors import PipelineError

# group 1 ends where the cut goes: after "x\n" before "Y", or after "x" before " word".
_SAFE_CUT = re.compile(rb"[\x21-\x7e](\n)[\x21-\x7e]|([\x21-\x7e]) [A-Za-z]")
# The train/val split: after a run of newlines before a visible character (UTF-8 lead bytes count as visible),
# failing that after a visible character before " word". Matches end where the cut goes.
_LINE_START = re.compile(rb"\n(?=[\x21-\x7e\xc2-\xf4])")
_WORD_START = re.compile(rb"[^\s](?= [A-Za-z\xc3-\xf4])")
_SEARCH_BYTES = 1 << 20
MIN_SPLIT_BYTES = 1024  # about 250 tokens: a validation split smaller than that measures nothing
CHUNK_DOCUMENTS = 65536  # document table entries read or converted at a time


@dataclass(frozen=True)
class Segment:
    """A byte range of a text file; each segment becomes one document (followed by EOT) in the shards."""

    offset: int
    length: int


class Segments(Sequence):
    """Many segments as two int64 arrays: a million documents cost 16 MB rather than a million objects.

    Indexing gives a ``Segment``, slicing and ``+`` give ``Segments``; equal to any sequence of the same segments.
    """

    def __init__(self, offsets: np.ndarray, lengths: np.ndarray):
        self.offsets, self.lengths = np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64)

    @classmethod
    def of(cls, segments: Sequence[Segment]) -> Segments:
        if isinstance(segments, Segments):
            return segments
        return cls(
            np.array([s.offset for s in segments], dtype=np.int64),
            np.array([s.length for s in segments], dtype=np.int64),
        )

    @classmethod
    def from_ends(cls, ends: np.ndarray) -> Segments:
        """Back-to-back documents from their end offsets (the download stage's documents.bin)."""
        ends = np.asarray(ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        return cls(starts, ends - starts)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Segments(self.offsets[index], self.lengths[index])
        return Segment(int(self.offsets[index]), int(self.lengths[index]))

    def __iter__(self) -> Iterator[Segment]:
        # In slices: Python ints for every document would cost ~70 B each
        for (
            offsets,
            lengths,
        ) in self.chunks():
            yield from map(Segment, offsets.tolist(), lengths.tolist())

    def __add__(self, other: Sequence[Segment]) -> Segments:
        other = Segments.of(other)
        return Segments(
            np.concatenate([self.offsets, other.offsets]), np.concatenate([self.lengths, other.lengths])
        )

    def __radd__(self, other: Sequence[Segment]) -> Segments:
        return Segments.of(other) + self

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Sequence)
            and len(other) == len(self)
            and all(a == b for a, b in zip(self, other, strict=True))
        )

    def total(self) -> int:
        return int(self.lengths.sum())

    def chunks(self, size: int = CHUNK_DOCUMENTS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(offsets, lengths)`` arrays of at most ``size`` documents, in order."""
        for start in range(0, len(self), size):
            yield self.offsets[start : start + size], self.lengths[start : start + size]

    def __repr__(self) -> str:
        return f"Segments({len(self)} documents, {self.total():,} bytes)"


class DocumentTable(Sequence):
    """The back-to-back documents of a corpus file, by their end offsets in a table on disk (the download stage's
    ``documents.bin``), clipped to the bytes ``[start, stop)``: read ``CHUNK_DOCUMENTS`` entries at a time, so
    memory does not grow with the number of documents. ``clip`` gives the documents of a byte range (a split).
    """

    def __init__(self, table: str | Path, count: int, start: int = 0, stop: int | None = None):
        self.table, self.count, self.start = Path(table), count, start
        self.stop = (int(self._ends(count - 1, 1)[0]) if count else 0) if stop is None else stop
        # The documents touching [start, stop): ends above start .. first end >= stop
        with self.table.open("rb") as f:
            self._first = _bisect_ends(f, count, start, right=True)
            self._last = _bisect_ends(f, count, self.stop, right=False)

    def _ends(self, index: int, n: int) -> np.ndarray:
        with self.table.open("rb") as f:
            f.seek(8 * index)  # one little-endian uint64 end offset per document
            return np.fromfile(f, dtype="<u8", count=n).astype(np.int64)

    def clip(self, start: int, stop: int) -> DocumentTable:
        return DocumentTable(self.table, self.count, start, stop)

    def total(self) -> int:
        return max(self.stop - self.start, 0)

    def __len__(self) -> int:
        return self._last - self._first + 1 if self.stop > self.start else 0

    def chunks(self, size: int = CHUNK_DOCUMENTS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(offsets, lengths)`` arrays of at most ``size`` documents, in order."""
        with self.table.open("rb") as f:
            for first in range(self._first, self._first + len(self), size):
                n = min(size, self._first + len(self) - first)
                f.seek(8 * max(first - 1, 0))  # from the previous document's end: it is this one's begin
                ends = np.fromfile(f, dtype="<u8", count=n + (first > 0)).astype(np.int64)
                begins = ends[:-1] if first > 0 else np.concatenate([[0], ends[:-1]])
                begins, ends = np.maximum(begins, self.start), np.minimum(ends[-n:], self.stop)
                yield begins, ends - begins

    def __iter__(self) -> Iterator[Segment]:
        for offsets, lengths in self.chunks():
            yield from map(Segment, offsets.tolist(), lengths.tolist())

    def __getitem__(self, index):
        if isinstance(index, slice):
            first, stop, step = index.indices(len(self))
            if step != 1:
                return Segments.of(list(self))[index]
            if stop <= first:
                return self.clip(self.start, self.start)
            return self.clip(self[first].offset, self[stop - 1].offset + self[stop - 1].length)
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        position = self._first + index % len(self)
        ends = self._ends(max(position - 1, 0), 2 if position else 1)
        begin, end = max(int(ends[0]) if position else 0, self.start), min(int(ends[-1]), self.stop)
        return Segment(begin, end - begin)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Sequence)
            and len(other) == len(self)
            and all(a == b for a, b in zip(self, other, strict=True))
        )

    def __repr__(self) -> str:
        return f"DocumentTable({self.table}, {len(self)} documents, {self.total():,} bytes)"


def _bisect_ends(f, count: int, value: int, right: bool) -> int:
    """The first index whose end is above ``value`` (``right``) or at least ``value``, by binary search on disk."""
    lo, hi = 0, count
    while lo < hi:
        middle = (lo + hi) // 2
        f.seek(8 * middle)
        end = int.from_bytes(f.read(8), "little")
        if end < value or (right and end == value):
            lo = middle + 1
        else:
            hi = middle
    return lo


def chunks_of(segments: Sequence[Segment]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(offsets, lengths)`` arrays of any sequence of segments, a bounded number at a time."""
    return (segments if isinstance(segments, Segments | DocumentTable) else Segments.of(segments)).chunks()


def total_bytes(segments: Sequence[Segment]) -> int:
    """The bytes of all the segments (without a pass in Python over each one where the type knows it)."""
    if isinstance(segments, Segments | DocumentTable):
        return segments.total()
    return sum(s.length for s in segments)


def _cut_at(match: re.Match) -> int:
    return match.end(1) if match.group(1) else match.end(2)


def safe_cut(buf: bytes) -> int:
    """The last safe cut position in ``buf`` (see the module docstring), else -1."""
    window = (
        4096  # search the tail first, then a window 16 times larger: the last cut is usually near the end
    )
    while True:
        start = max(len(buf) - window, 0)
        last = collections.deque(_SAFE_CUT.finditer(buf, start), maxlen=1)  # keeps only the last match
        if last:
            return _cut_at(last[0])
        if start == 0:
            return -1
        window *= 16


def fallback_cut(buf: bytes) -> int:
    """Where to cut a block with no safe cut (one enormous line): at a UTF-8 character boundary, never mid-char."""
    cut = len(buf)
    while cut > 0 and buf[cut - 1] & 0xC0 == 0x80:  # 10xxxxxx: a continuation byte, step back over it
        cut -= 1
    if cut > 0 and buf[cut - 1] >= 0xC0:  # a lead byte whose continuation bytes are past the end
        cut -= 1
    return cut or len(buf)


def read_runs(
    path: str | Path, segments: Sequence[Segment], run_bytes: int
) -> Iterator[tuple[int, bytes, list[int]]]:
    """Yield ``(offset, buf, ends)``: consecutive segments read at once, at most ``run_bytes`` at a time.

    ``ends`` are the positions in ``buf`` where a segment finishes; ``len(buf)`` is not among them when ``buf``
    stops inside a segment longer than ``run_bytes``, which is read in pieces cut at safe positions. Empty
    segments are skipped. ``offset`` is where ``buf`` starts in the file, for error messages.
    """
    path = Path(path)
    with path.open("rb") as f:
        start, size, ends = 0, 0, []
        for offsets, lengths in chunks_of(segments):
            for offset, length in zip(offsets.tolist(), lengths.tolist(), strict=True):
                if length == 0:
                    continue
                # One read per run rather than per segment: a dataset corpus has millions of short documents. The run
                # ends where the next segment is not adjacent in the file or would not fit.
                if ends and (offset != start + size or size + length > run_bytes):
                    yield start, _read_exactly(f, path, start, size), ends
                    size, ends = 0, []
                if length > run_bytes:
                    yield from _read_long(f, path, offset, length, run_bytes)
                    continue
                if not ends:
                    start = offset
                size += length
                ends.append(size)
        if ends:
            yield start, _read_exactly(f, path, start, size), ends


def _read_exactly(f, path: Path, position: int, size: int) -> bytes:
    f.seek(position)
    buf = f.read(size)
    if len(buf) < size:
        raise PipelineError(f"{path}: file ends at byte {position + len(buf)}, expected {position + size}")
    return buf


def _read_long(
    f, path: Path, offset: int, length: int, run_bytes: int
) -> Iterator[tuple[int, bytes, list[int]]]:
    """One segment longer than ``run_bytes``, in pieces cut at safe positions (the last piece ends the segment)."""
    position, end = offset, offset + length
    while position < end:
        buf = _read_exactly(f, path, position, min(run_bytes, end - position))
        if position + len(buf) < end:
            cut = safe_cut(buf)
            buf = buf[: cut if cut > 0 else fallback_cut(buf)]
        yield position, buf, [len(buf)] if position + len(buf) == end else []
        position += len(buf)


def decode_utf8(buf: bytes, path: Path, offset: int) -> str:
    """``buf`` as text, or one error naming the file and the byte (``offset`` is where ``buf`` starts in it)."""
    try:
        return buf.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not valid UTF-8 at byte {offset + exc.start}") from None


def read_blocks(
    path: str | Path, segments: Sequence[Segment], block_bytes: int
) -> Iterator[tuple[str, int, bool]]:
    """Yield ``(text, n_bytes, ends_segment)`` per segment, or per piece of one longer than ``block_bytes`` (cut
    at safe positions): the documents one by one, as a tokenizer trainer or a per-document encoder wants them."""
    path = Path(path)
    for offset, buf, ends in read_runs(path, segments, block_bytes):
        begin = 0
        for end in ends:
            yield decode_utf8(buf[begin:end], path, offset + begin), end - begin, True
            begin = end
        if begin < len(buf):
            yield decode_utf8(buf[begin:], path, offset + begin), len(buf) - begin, False


SAMPLE_WINDOW = 1 << 20


def sample_text(path: str | Path, segments: Sequence[Segment], budget: int, seed: int) -> Iterator[str]:
    """About ``budget`` bytes of the segments as 1 MiB windows chosen at random (seeded), in file order.

    What a tokenizer trains on when the corpus is larger than memory or time allow: windows spread over the
    whole corpus see every part of it. A window's edges are moved to character boundaries (a few bytes lost).
    The segments are walked once, a chunk at a time, so memory does not grow with their number.
    """
    path = Path(path)
    total = total_bytes(segments)
    count = -(-total // SAMPLE_WINDOW)  # ceil: the windows that tile the text
    windows = iter(sorted(random.Random(seed).sample(range(count), min(count, -(-budget // SAMPLE_WINDOW)))))
    window, seen = next(windows, None), 0
    with path.open("rb") as f:
        for offsets, lengths in chunks_of(segments):
            ends = seen + np.cumsum(lengths)
            seen = int(ends[-1]) if len(ends) else seen
            while window is not None:
                position, stop = window * SAMPLE_WINDOW, min((window + 1) * SAMPLE_WINDOW, total)
                position = (
                    max(position, int(ends[0] - lengths[0])) if len(ends) else position
                )  # resumed in this chunk
                if position >= seen:
                    break
                while position < min(stop, seen):  # a window may span several segments: read each piece
                    index = int(np.searchsorted(ends, position, side="right"))
                    start_in = position - (int(ends[index]) - int(lengths[index]))
                    length = min(stop, int(ends[index])) - position
                    f.seek(int(offsets[index]) + start_in)
                    buf = f.read(length)
                    buf = buf[
                        len(buf) - len(buf.lstrip(bytes(range(0x80, 0xC0)))) :
                    ]  # no continuation bytes first
                    buf = buf[: fallback_cut(buf)] if position + length < int(ends[index]) else buf
                    position += length
                    if buf:
                        yield buf.decode("utf-8", errors="strict")
                if position < stop:
                    break  # the window goes on in the next chunk
                window = next(windows, None)


def split_tail(
    path: str | Path, documents: Sequence[Segment], fraction: float
) -> tuple[Sequence[Segment], Sequence[Segment]]:
    """Split documents into (head, tail) with about ``fraction`` of the bytes in the tail.

    The cut falls inside a document if need be, so a single novel or story gets both splits: at the first line
    start (a run of newlines, then a visible character) at or after the target byte, else the last one before it,
    else at a space before a word; the head and the tail each keep at least ``MIN_SPLIT_BYTES``. Each side is
    then encoded as a document of its own. Deterministic: no random choice. A ``DocumentTable`` splits into two
    (byte ranges of its file, nothing loaded); other sequences into ``Segments``.
    """
    path = Path(path)
    documents = documents if isinstance(documents, DocumentTable) else Segments.of(documents)
    total = documents.total()
    smaller = min(fraction, 1 - fraction)
    if total * smaller < MIN_SPLIT_BYTES:
        split, need = "val" if fraction <= 0.5 else "train", math.ceil(round(MIN_SPLIT_BYTES / smaller, 6))
        raise PipelineError(
            f"{path}: {total:,} bytes of text, too short for a {split} split at shards.val_fraction={fraction}: "
            f"each split needs at least {MIN_SPLIT_BYTES:,} bytes, so the corpus at least {need:,}"
        )
    target = round(total * (1 - fraction))
    index, doc, seen = _document_at(documents, target)
    lo, hi = max(MIN_SPLIT_BYTES - seen, 0), min(total - MIN_SPLIT_BYTES - seen, doc.length)
    cut = _cut_near(path, doc, target - seen, lo, hi)
    if cut is None:
        raise PipelineError(
            f"{path}: no line start or space before a word within {_SEARCH_BYTES:,} bytes of byte {target:,} "
            f"(the document at byte {doc.offset:,}) to cut the train/val split at shards.val_fraction={fraction}"
        )
    if isinstance(documents, DocumentTable):  # back to back: each split is a byte range of the file
        return documents.clip(documents.start, doc.offset + cut), documents.clip(
            doc.offset + cut, documents.stop
        )
    head = documents[:index] + ([Segment(doc.offset, cut)] if cut > 0 else [])
    tail = ([Segment(doc.offset + cut, doc.length - cut)] if cut < doc.length else []) + documents[
        index + 1 :
    ]
    return head, tail


def _document_at(documents: Segments | DocumentTable, position: int) -> tuple[int, Segment, int]:
    """(index, segment, bytes before it) of the document holding byte ``position`` of the documents' text."""
    index = seen = 0
    for offsets, lengths in documents.chunks():
        ends = seen + np.cumsum(lengths)
        if int(ends[-1]) > position:
            k = int(np.searchsorted(ends, position, side="right"))
            return index + k, Segment(int(offsets[k]), int(lengths[k])), int(ends[k] - lengths[k])
        index, seen = index + len(lengths), int(ends[-1])
    raise PipelineError(f"byte {position:,} is past the documents' {seen:,} bytes")


def _cut_near(path: Path, doc: Segment, wanted: int, lo: int, hi: int) -> int | None:
    """The split point inside ``doc`` nearest ``wanted`` (see split_tail), between ``lo`` and ``hi``; None if none.

    A document boundary (0 or the document's length) is the last resort, when no cut inside it is in range.
    """
    start = max(lo, wanted - _SEARCH_BYTES, 0)
    with path.open("rb") as f:
        f.seek(doc.offset + start)
        buf = f.read(
            min(hi, wanted + _SEARCH_BYTES) + 1 - start
        )  # + 1: a cut at hi needs the byte its lookahead reads
    for pattern in (_LINE_START, _WORD_START):
        cuts = [m.end() + start for m in pattern.finditer(buf)]
        cuts = [c for c in cuts if lo <= c <= hi and 0 < c < doc.length]
        after = [c for c in cuts if c >= wanted]
        if after or cuts:
            return after[0] if after else cuts[-1]
    edges = [c for c in (0, doc.length) if lo <= c <= hi]
    return min(edges, key=lambda c: abs(c - wanted)) if edges else None
