"""Token shards: a streaming writer with bounded memory, the manifest, and the memmap reader/sampler.

Layout of ``data/shards/``::

    train_0000.bin … val_0000.bin   raw little-endian token ids (uint16 when the vocab fits, else uint32)
    manifest.json                   dtype, EOT id, tokenizer fingerprint; per split: tokens, text bytes,
                                    documents and shards (file, tokens, dtype, sha256)

Documents are separated by EOT. The writer holds at most two encode batches in memory, so RSS does not
grow with the corpus. torch is imported only by the reader's tensor methods, so writing shards (the
tokenize stage) does not pay for it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tiktoken
from tqdm import tqdm

from pipeline.common.errors import PipelineError
from pipeline.common.hashing import sha256_file
from pipeline.common.json_files import read_json
from pipeline.data.textstream import Segment, decode_utf8, read_runs, total_bytes
from pipeline.data.tokenizer import EOT, clone_encoding

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_LITTLE_ENDIAN = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_EOT_BYTES = EOT.encode()


def dtype_for_vocab(n_vocab: int) -> np.dtype:
    """uint16 halves disk and page cache whenever every id fits."""
    return np.dtype(np.uint16) if n_vocab <= 65535 else np.dtype(np.uint32)


def encode_threads() -> int:
    """The cores this process may use (tiktoken's batch encoder runs one text per thread)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ShardWriter:
    """Appends token arrays to ``{split}_NNNN.bin`` files of at most ``shard_tokens`` tokens, hashing as it goes."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = Path(directory), split, shard_tokens
        self.dtype = _LITTLE_ENDIAN[
            np.dtype(dtype).name
        ]  # explicit '<': the files read the same on every machine
        self.shards: list[dict] = []
        self._file = None
        self._hash = hashlib.sha256()
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        """Append ``tokens``; an id the dtype cannot hold is refused rather than silently wrapped around."""
        limit = np.iinfo(self.dtype).max
        if tokens.size and int(tokens.max()) > limit:
            raise PipelineError(
                f"{self.directory / self._name()}: token id {int(tokens.max())} does not fit {self.dtype.name} "
                f"(max {limit}): the tokenizer's vocab is too large for this shard dtype"
            )
        tokens = tokens.astype(self.dtype, copy=False)
        while tokens.size:
            if self._file is None:
                self._file = (self.directory / self._name()).open("wb")
                self._hash, self._count = hashlib.sha256(), 0
            # head: what still fits in the current shard; the rest goes on to the next one
            head, tokens = (
                tokens[: self.shard_tokens - self._count],
                tokens[self.shard_tokens - self._count :],
            )
            self._file.write(head.data)  # the array's own buffer: no copy
            self._hash.update(head.data)
            self._count += head.size
            if self._count == self.shard_tokens:
                self._close_shard()

    def close(self) -> list[dict]:
        """Finish the last shard; returns the manifest entries of every shard written."""
        if self._file is not None:
            self._close_shard()
        return self.shards

    def _name(self) -> str:
        return f"{self.split}_{len(self.shards):04d}.bin"

    def _close_shard(self) -> None:
        self._file.close()
        self._file = None
        self.shards.append(
            {
                "file": self._name(),
                "tokens": self._count,
                "dtype": self.dtype.name,
                "sha256": self._hash.hexdigest(),
            }
        )


def piece_bytes(batch_bytes: int, threads: int) -> int:
    """A few pieces per thread and batch, so every encode thread stays busy."""
    return max(batch_bytes // (4 * threads), 4096)


def encode_piece(enc: tiktoken.Encoding, text: str) -> np.ndarray:
    """``encode_ordinary`` straight into a uint32 array."""
    # tiktoken's Rust core fills the buffer with the GIL released: no Python int is ever made for a token (lists
    # of them cost the tokenize stage dearly, BENCHMARKS.md). No special token is allowed or refused: a literal
    # <|endoftext|> in the text is ordinary text, exactly as encode_ordinary treats it.
    return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())


def encode_run(enc: tiktoken.Encoding, path: Path, offset: int, buf: bytes, ends: list[int]) -> np.ndarray:
    """The tokens of a run of documents (``textstream.read_runs``), EOT after each one that ends in it."""
    bounds = list(
        zip([0, *ends], [*ends, len(buf)], strict=True)
    )  # the last one: after the last end, maybe empty
    if _EOT_BYTES not in buf:
        # One text with the EOT token's text between the documents: tiktoken encodes the text between two allowed
        # special tokens on its own, so this is exactly each document encoded whole, without a call (and the GIL)
        # per document.
        try:
            text = _EOT_BYTES.join(buf[begin:end] for begin, end in bounds).decode("utf-8")
        except UnicodeDecodeError:
            for begin, end in bounds:  # the document at fault raises, naming its byte in the file
                decode_utf8(buf[begin:end], path, offset + begin)
            raise
        return enc.encode_to_numpy(text, allowed_special={EOT}, disallowed_special=())
    # The EOT text occurs literally in this run: document by document, so that text stays ordinary text.
    eot = np.array([enc.eot_token], dtype=np.uint32)
    tokens = []
    for i, (begin, end) in enumerate(bounds):
        tokens.append(encode_piece(enc, decode_utf8(buf[begin:end], path, offset + begin)))
        if i < len(ends):
            tokens.append(eot)
    return np.concatenate(tokens)


def encode_segments(
    enc: tiktoken.Encoding, path: Path, segments: Sequence[Segment], batch_bytes: int, threads: int
) -> Iterator[tuple[np.ndarray, int]]:
    """``(uint32 tokens, text bytes)`` per run of documents, in order, EOT after each segment.

    Runs of about ``batch_bytes / (4 * threads)`` go to ``threads`` encoder threads; at most ``batch_bytes`` of
    text is in flight.
    """
    own = threading.local()  # each encoder thread its own copy of the tokenizer (tokenizer.clone_encoding)

    def encode(offset: int, buf: bytes, ends: list[int]) -> np.ndarray:
        if not hasattr(own, "enc"):
            own.enc = clone_encoding(enc)
        return encode_run(own.enc, path, offset, buf, ends)

    in_flight: collections.deque = collections.deque()
    held = 0
    with ThreadPoolExecutor(threads) as pool:
        for offset, buf, ends in read_runs(path, segments, piece_bytes(batch_bytes, threads)):
            in_flight.append((pool.submit(encode, offset, buf, ends), len(buf)))
            held += len(buf)
            # While the caller writes one run's tokens, up to batch_bytes of the following runs are already read
            # and encoding: the cores never wait for the disk, and memory stays bounded.
            while held > batch_bytes:
                future, n_bytes = in_flight.popleft()
                held -= n_bytes
                yield future.result(), n_bytes
        for future, n_bytes in in_flight:
            yield future.result(), n_bytes


def write_shards(
    enc: tiktoken.Encoding,
    corpus: str | Path,
    splits: dict[str, Sequence[Segment]],
    directory: str | Path,
    *,
    fingerprint: str,
    shard_tokens: int,
    batch_bytes: int,
    threads: int | None = None,
) -> dict:
    """Tokenize each split's byte ranges of ``corpus`` into shards + manifest.json in ``directory``; returns the manifest.

    ``directory`` should be a temp dir the caller renames into place (``checkpoint.atomic_path``).
    """
    corpus, directory = Path(corpus), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    threads = threads or encode_threads()
    dtype = dtype_for_vocab(enc.n_vocab)
    manifest: dict = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": enc.n_vocab,
        "eot_token": enc.eot_token,
        "tokenizer_fingerprint": fingerprint,
        "splits": {},
    }
    for split, segments in splits.items():
        writer = ShardWriter(directory, split, dtype, shard_tokens)
        text_bytes = total_bytes(segments)
        with tqdm(total=text_bytes, unit="B", unit_scale=True, desc=f"tokenize {split}", leave=False) as bar:
            for tokens, n_bytes in encode_segments(enc, corpus, segments, batch_bytes, threads):
                writer.write(tokens)
                bar.update(n_bytes)
        shards = writer.close()
        manifest["splits"][split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "text_bytes": text_bytes,
            "documents": len(segments),
            "shards": shards,
        }
    manifest["total_tokens"] = sum(s["tokens"] for s in manifest["splits"].values())
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    manifest = read_json(path, "shard manifest", "run `dvc repro tokenize`")
    if manifest.get("format") != FORMAT_VERSION or manifest.get("dtype") not in _LITTLE_ENDIAN:
        raise PipelineError(
            f"{path}: unsupported shard manifest (format {manifest.get('format')!r}, "
            f"dtype {manifest.get('dtype')!r})"
        )
    if problem := _manifest_problem(manifest):
        raise PipelineError(f"{path}: invalid shard manifest: {problem} (re-run `dvc repro tokenize`)")
    return manifest


_MANIFEST_FIELDS = {"tokenizer_fingerprint": str, "vocab_size": int, "eot_token": int, "splits": dict}
_SPLIT_FIELDS = {"text_bytes": int, "tokens": int, "shards": list}
_SHARD_FIELDS = {"file": str, "dtype": str, "tokens": int, "sha256": str}


def _manifest_problem(manifest: dict) -> str | None:
    """The first missing or mistyped field of a shard manifest, named by its path; None when it is sound."""

    def wrong(data: object, fields: dict[str, type], where: str) -> str | None:
        if not isinstance(data, dict):
            return f"{where or 'the manifest'} is not an object"
        for key, kind in fields.items():
            value = data.get(key)
            # Bool is an int subclass: true is no count
            if not isinstance(value, kind) or isinstance(value, bool):
                return f"'{where}{key}' is missing or not a {kind.__name__}"
        return None

    if problem := wrong(manifest, _MANIFEST_FIELDS, ""):
        return problem
    for split, info in manifest["splits"].items():
        if problem := wrong(info, _SPLIT_FIELDS, f"splits.{split}."):
            return problem
        for i, shard in enumerate(info["shards"]):
            if problem := wrong(shard, _SHARD_FIELDS, f"splits.{split}.shards[{i}]."):
                return problem
    return None


class ShardDataset:
    """One split of the shards as read-only memmaps: random training windows and deterministic eval windows.

    Refuses (PipelineError naming the file) a shard that is missing, truncated, of another dtype, corrupt
    (sha256, when ``verify``), or written by a tokenizer other than ``expected_fingerprint``.
    """

    def __init__(
        self,
        directory: str | Path,
        split: str = "train",
        expected_fingerprint: str | None = None,
        verify: bool = True,
    ):
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        where = self.directory / MANIFEST
        self.fingerprint: str = manifest["tokenizer_fingerprint"]
        if expected_fingerprint is not None and expected_fingerprint != self.fingerprint:
            raise PipelineError(
                f"{where}: shards were written with tokenizer {self.fingerprint[:12]}…, expected "
                f"{expected_fingerprint[:12]}… (re-run `dvc repro tokenize`)"
            )
        if split not in manifest["splits"]:
            raise PipelineError(f"{where}: no split {split!r} (has {', '.join(manifest['splits'])})")
        info = manifest["splits"][split]
        self.split = split
        self.dtype = _LITTLE_ENDIAN[manifest["dtype"]]
        self.vocab_size: int = manifest["vocab_size"]
        self.eot_token: int = manifest["eot_token"]
        self.text_bytes: int = info["text_bytes"]
        self.arrays = [self._open(shard, verify) for shard in info["shards"]]
        self.num_tokens = sum(a.size for a in self.arrays)

    def _open(self, shard: dict, verify: bool) -> np.memmap:
        name = shard["file"]
        path = self.directory / name
        if Path(name).name != name:  # no directories in a name: the manifest cannot point outside `directory`
            raise PipelineError(f"{self.directory / MANIFEST}: shard name {name!r} is not a plain file name")
        if shard["dtype"] != self.dtype.name:
            raise PipelineError(
                f"{path}: dtype {shard['dtype']} differs from the manifest's {self.dtype.name}"
            )
        if not path.is_file():
            raise PipelineError(f"{path}: shard missing")
        expected = shard["tokens"] * self.dtype.itemsize
        size = path.stat().st_size
        if size != expected:
            raise PipelineError(
                f"{path}: {size} bytes, expected {expected} ({shard['tokens']} {self.dtype.name} tokens): "
                "truncated or not written with this dtype"
            )
        if verify and sha256_file(path) != shard["sha256"]:
            raise PipelineError(f"{path}: sha256 does not match the manifest (corrupt shard)")
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["tokens"],))  # paged in on demand

    def _window_starts(self, context_length: int) -> np.ndarray:
        """Cumulative count of window starts per shard (a window needs context_length + 1 tokens)."""
        if context_length < 1:
            raise PipelineError(f"context_length must be >= 1, got {context_length}")
        # starts p with p + context_length + 1 <= size: the last input token still has its target
        counts = np.array([max(a.size - context_length, 0) for a in self.arrays], dtype=np.int64)
        if counts.sum() == 0:
            raise PipelineError(
                f"{self.directory / MANIFEST}: split {self.split!r} has no shard with {context_length + 1} tokens "
                f"(largest {max(a.size for a in self.arrays)}): lower the context length or add text"
            )
        return np.cumsum(counts)

    def _stack(
        self, positions: Iterable[tuple[int, int]], context_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        # (B, context_length + 1), int64: what nn.Embedding and cross_entropy take
        windows = np.stack([self.arrays[s][p : p + context_length + 1] for s, p in positions]).astype(
            np.int64
        )
        # x = window[:-1], y = window[1:]: the next token of every position; copies, so each is contiguous
        return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())

    def strided(self, context_length: int, stride: int) -> list[tuple[int, int]]:
        """(shard, offset) of every window starting at a multiple of ``stride`` (the book's GPTDatasetV1)."""
        self._window_starts(context_length)
        return [(s, p) for s, a in enumerate(self.arrays) for p in range(0, a.size - context_length, stride)]

    def windows(
        self, positions: Iterable[tuple[int, int]], context_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows at ``positions`` (from ``strided``): inputs and targets shifted by one."""
        return self._stack(positions, context_length)

    def sample(
        self, batch_size: int, context_length: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows (x, y = x shifted by one), uniform over every start in every shard."""
        import torch

        cumulative = self._window_starts(context_length)
        # one index over every shard's starts, so each start is equally likely whatever its shard's size
        draws = torch.randint(int(cumulative[-1]), (batch_size,), generator=generator).numpy()
        shards = np.searchsorted(cumulative, draws, side="right")  # the shard each draw falls in
        offsets = draws - np.concatenate([[0], cumulative])[shards]  # its start within that shard
        return self._stack(zip(shards.tolist(), offsets.tolist(), strict=False), context_length)

    def sequential(
        self, batch_size: int, context_length: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows from the start of each shard, in order; the last batch may be smaller."""
        self._window_starts(context_length)
        positions = (
            (s, p)
            for s, a in enumerate(self.arrays)
            for p in range(0, a.size - context_length, context_length)
        )
        batches = 0
        while max_batches is None or batches < max_batches:
            chunk = [
                pos for _, pos in zip(range(batch_size), positions, strict=False)
            ]  # the next batch_size windows
            if not chunk:
                return
            yield self._stack(chunk, context_length)
            batches += 1
