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
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

# group 1 ends where the cut goes: after "x\n" before "Y", or after "x" before " word".
_SAFE_CUT = re.compile(rb"[\x21-\x7e](\n)[\x21-\x7e]|([\x21-\x7e]) [A-Za-z]")
_LINE_CUT = re.compile(rb"[\x21-\x7e](\n)[\x21-\x7e]")  # the train/val split: only at line starts


@dataclass(frozen=True)
class Segment:
    """A byte range of a text file; each segment becomes one document (followed by EOT) in the shards."""

    offset: int
    length: int


def _cut_at(match: re.Match) -> int:
    return match.end(1) if match.group(1) else match.end(2)


def safe_cut(buf: bytes, pattern: re.Pattern = _SAFE_CUT) -> int:
    """The last safe cut position in ``buf`` (see the module docstring), else -1."""
    window = 4096
    while True:
        start = max(len(buf) - window, 0)
        last = collections.deque(pattern.finditer(buf, start), maxlen=1)
        if last:
            return _cut_at(last[0])
        if start == 0:
            return -1
        window *= 16


def fallback_cut(buf: bytes) -> int:
    """Where to cut a block with no safe cut (one enormous line): at a UTF-8 character boundary, never mid-char."""
    cut = len(buf)
    while cut > 0 and buf[cut - 1] & 0xC0 == 0x80:
        cut -= 1
    if cut > 0 and buf[cut - 1] >= 0xC0:  # a lead byte whose continuation bytes are past the end
        cut -= 1
    return cut or len(buf)


def read_blocks(path: str | Path, segments: list[Segment], block_bytes: int) -> Iterator[tuple[str, int, bool]]:
    """Yield ``(text, n_bytes, ends_segment)`` blocks of at most ``block_bytes`` bytes, cut at safe positions."""
    path = Path(path)
    with path.open("rb") as f:
        for segment in segments:
            position, end = segment.offset, segment.offset + segment.length
            while position < end:
                f.seek(position)
                want = min(block_bytes, end - position)
                buf = f.read(want)
                if len(buf) < want:
                    raise PipelineError(f"{path}: file ends at byte {position + len(buf)}, expected {end}")
                last = position + len(buf) >= end
                if not last:
                    cut = safe_cut(buf)
                    buf = buf[: cut if cut > 0 else fallback_cut(buf)]
                try:
                    text = buf.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise PipelineError(f"{path}: not valid UTF-8 at byte {position + exc.start}") from None
                position += len(buf)
                yield text, len(buf), last


def split_tail(path: str | Path, documents: list[Segment], fraction: float) -> tuple[list[Segment], list[Segment]]:
    """Split documents into (head, tail) with about ``fraction`` of the bytes in the tail.

    The cut falls at the start of a line (a safe cut), inside a document if need be, so even a one-document corpus
    (a single novel) gets both parts. Deterministic: no random choice.
    """
    path = Path(path)
    total = sum(d.length for d in documents)
    target = round(total * (1 - fraction))
    seen = 0
    for index, doc in enumerate(documents):
        if seen + doc.length <= target:
            seen += doc.length
            continue
        cut = _cut_near(path, doc, target - seen)
        head = documents[:index] + ([Segment(doc.offset, cut)] if cut > 0 else [])
        tail = ([Segment(doc.offset + cut, doc.length - cut)] if cut < doc.length else []) + documents[index + 1 :]
        return head, tail
    return list(documents), []


def _cut_near(path: Path, doc: Segment, wanted: int, window: int = 1 << 20) -> int:
    """A line start inside ``doc`` at or after ``wanted`` bytes (else before it); 0 when the document has none."""
    end = doc.offset + doc.length
    with path.open("rb") as f:
        start = max(doc.offset + wanted - 2, doc.offset)  # a match begins up to two bytes before its cut
        while start < end - 2:
            f.seek(start)
            match = _LINE_CUT.search(f.read(min(window, end - start)))
            if match:
                return start + _cut_at(match) - doc.offset
            start += window - 2
        back = max(doc.offset, doc.offset + wanted - window)
        f.seek(back)
        cut = safe_cut(f.read(doc.offset + wanted + 1 - back), _LINE_CUT)
        return back + cut - doc.offset if cut > 0 else 0
