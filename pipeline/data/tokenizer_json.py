"""A Hugging Face ``tokenizer.json`` (byte-level BPE: Llama 3, SmolLM2, Qwen) as our tokenizer, a ``tiktoken.Encoding``.

A byte-level BPE vocabulary is tiktoken's ranks written in GPT-2's byte-to-unicode alphabet: each token's id is
its rank, provided the merges made tokens in id order (what ``tokenizers``' trainer and the tiktoken-born
vocabularies of Llama 3 and Qwen do; anything else is refused). The split regex comes from the pre-tokenizer
(``Split`` + ``ByteLevel(use_regex=false)``, ``ByteLevel``'s own GPT-2 regex, or SmolLM2's ``Digits`` before it);
the added tokens keep their ids as special tokens, and our 16 special tokens are appended where missing, so SFT
and chat find their markers. Because tiktoken merges by the rank of the merged bytes and ``tokenizers`` by the
listed pair, and a pre-tokenizer sequence is not always one regex, the conversion is proven, not assumed: the
``tokenizers`` library must give the same ids on the texts the caller checks (the corpus), or it is refused.

Where the file comes from (a directory, or a Hub repo fetched with ``huggingface_hub``) is the caller's business;
this module reads that file (and hands the tokenizer_config.json beside it to chat_template.py, which reads the
base's chat template) and knows nothing of models.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import tiktoken

from pipeline.common.errors import PipelineError
from pipeline.common.json_files import read_json
from pipeline.data import chat_template
from pipeline.data.tokenizer import SPECIAL_TOKENS

FILE = "tokenizer.json"
# tokenizers' ByteLevel(use_regex=true) split: GPT-2's pattern, spelt without possessive quantifiers
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2's Digits(individual_digits) before ByteLevel: each digit alone, else GPT-2's pattern, where the
# digit ends the piece before it (so whitespace before a digit stays whole, as at the end of a text)
DIGITS_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
# The Split regexes of Llama 3's and Qwen2/Qwen3's tokenizer.json (llama.cpp knows them as llama-bpe and qwen2)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
CHECK_CHARS = 400_000  # of the texts handed to the check: enough to meet every common merge
# Checked first: digits after spaces, CRLF, contractions, accents (composed and not), emoji, CJK
EDGE_TEXTS = (
    "Año 1605: 1234567  x  89.5%\n\n\t hola  2 \t3\r\n\r\n",
    "don't I'LL we've   trailing   ",
    "😀🚀 漢字 naïve Ma\u0301laga ¡Olé!",
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (the alphabet byte-level BPE vocabularies are written in)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _pattern(pre: dict | None, origin: str) -> str:
    """The split regex a pre-tokenizer applies (one regex for the supported shapes)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [step.get("type") for step in steps]
    last = steps[-1] if steps else {}
    if kinds and kinds[-1] == "ByteLevel" and not last.get("add_prefix_space", False):
        if kinds == ["ByteLevel"] and last.get("use_regex", True):
            return BYTE_LEVEL_PATTERN
        if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
            split = steps[0]
            if (
                split.get("behavior") == "Isolated"
                and not split.get("invert")
                and "Regex" in split["pattern"]
            ):
                return split["pattern"]["Regex"]
        if (
            kinds == ["Digits", "ByteLevel"]
            and steps[0].get("individual_digits")
            and last.get("use_regex", True)
        ):
            return DIGITS_PATTERN
    raise PipelineError(
        f"{origin}: pre_tokenizer {kinds or None} is not a byte-level split this pipeline reproduces "
        "(ByteLevel; Split + ByteLevel(use_regex=false); Digits + ByteLevel)"
    )


def _ranks(model: dict, added: dict[str, int], origin: str) -> dict[bytes, int]:
    """Token bytes → id for the BPE vocabulary (added tokens left out), checked to be tiktoken ranks."""
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise PipelineError(f"{origin}: model {model.get('type')!r} is not a plain byte-level BPE")
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, token_id in model["vocab"].items():
        if token in added:
            continue
        try:
            ranks[bytes(to_byte[c] for c in token)] = token_id
        except KeyError:
            raise PipelineError(
                f"{origin}: token {token!r} is not written in the byte-level alphabet"
            ) from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise PipelineError(
            f"{origin}: the vocabulary lacks {len(missing)} of the 256 bytes (e.g. {missing[0]})"
        )
    last = -1
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = model["vocab"].get(left + right)
        if token_id is None or token_id <= last:
            raise PipelineError(
                f"{origin}: merge {left!r} + {right!r} does not make tokens in id order, so ids are not ranks"
            )
        last = token_id
    return ranks


def read(path: Path) -> tuple[tiktoken.Encoding, dict]:
    """The tokenizer in ``path`` (a tokenizer.json) as an Encoding, and what metadata.json records about it."""
    data = read_json(path, FILE)
    if not isinstance(data.get("model"), dict):
        raise PipelineError(f"{path}: not a tokenizer.json (no model)")
    if data.get("normalizer") is not None:
        raise PipelineError(f"{path}: a normalizer ({data['normalizer'].get('type')}) is not supported")
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    ranks = _ranks(data["model"], added, str(path))
    special = dict(added)
    next_id = max([*ranks.values(), *special.values()]) + 1
    for token in SPECIAL_TOKENS:  # ours, after the model's own ids
        if token not in special:
            special[token] = next_id
            next_id += 1
    n_vocab = max(special.values()) + 1
    if len(ranks) + len(special) != n_vocab:
        raise PipelineError(
            f"{path}: token ids are not contiguous ({len(ranks) + len(special)} tokens, ids to {n_vocab - 1})"
        )
    enc = tiktoken.Encoding(
        f"llm-pipeline-hf-{path.parent.name}",
        pat_str=_pattern(data.get("pre_tokenizer"), str(path)),
        mergeable_ranks=ranks,
        special_tokens=special,
        explicit_n_vocab=n_vocab,
    )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return enc, {"tokenizer_json_sha256": digest, "model_tokens": len(ranks) + len(added)}


def check_same_ids(enc: tiktoken.Encoding, path: Path, texts: Iterable[str]) -> int:
    """Characters of ``texts`` (up to CHECK_CHARS) on which the ``tokenizers`` library, reading ``path``, gives
    ``enc``'s ids; the first difference is refused in one line."""
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(path))
    checked = 0
    for text in texts:
        for line in text[: CHECK_CHARS - checked].splitlines(keepends=True):
            ours = enc.encode(line, allowed_special="all")
            theirs = reference.encode(line, add_special_tokens=False).ids
            if ours != theirs:
                at = next(
                    (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                    min(len(ours), len(theirs)),
                )
                raise PipelineError(
                    f"{path}: the tiktoken conversion splits {line[:60]!r} differently from tokenizers at token {at} "
                    f"(ours {ours[at : at + 4]}, tokenizers {theirs[at : at + 4]}): not reproduced exactly"
                )
        checked += min(len(text), CHECK_CHARS - checked)
        if checked >= CHECK_CHARS:
            break
    return checked


def resolve(source: str, revision: str | None = None, name: str = FILE) -> Path | None:
    """``tokenizer.source``: a directory (or file) holding tokenizer.json, or a Hub repo id fetched through
    huggingface_hub (its cache, HF_HUB_OFFLINE and HF_ENDPOINT apply). With another ``name`` (the
    tokenizer_config.json beside it): that file, or None where the source has none."""
    path = Path(source).expanduser()
    if path.is_file() and name != FILE:
        path = path.parent
    if path.is_dir():
        path = path / name
    if path.is_file():
        return path
    if name != FILE and (path.parent.is_dir() or "/" not in source or source.count("/") > 1):
        return None
    if path.exists() or "/" not in source or source.count("/") > 1:
        raise PipelineError(
            f"tokenizer.source={source}: no {FILE} there (a directory, a file or a Hub repo id)"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    optional = name != FILE  # tokenizer_config.json may be absent
    try:
        return Path(hf_hub_download(source, name, revision=revision or "main"))
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        if optional and isinstance(exc, (EntryNotFoundError, LocalEntryNotFoundError)):
            return None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PipelineError(
            f"tokenizer.source={source}: {name} not found locally or on the Hub ({first})"
        ) from None


def load_checked(source: str, revision: str | None, texts: Iterable[str]) -> tuple[tiktoken.Encoding, dict]:
    """``tokenizer.source``'s tokenizer.json as an Encoding, proven on the edge cases and ``texts``; with what
    metadata.json records (source, revision, the file's sha256, the model's own token count, and the chat
    template of the tokenizer_config.json beside it, if it has one)."""
    path = resolve(source, revision)
    enc, meta = read(path)
    check_same_ids(enc, path, [*EDGE_TEXTS, *texts])
    config = resolve(source, revision, chat_template.CONFIG_FILE)
    template = chat_template.read_config(config) if config is not None else None
    return enc, {
        "source": source,
        "revision": revision,
        **meta,
        **({"chat_template": template} if template else {}),
    }
