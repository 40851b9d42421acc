"""Tokenizers: each kind round-trips, carries the special tokens, saves/loads offline with a checked fingerprint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tiktoken

from pipeline.common.errors import PipelineError
from pipeline.data.tokenizer import (
    ASSISTANT,
    END_OF_TURN,
    EOT,
    RANKS_FILE,
    SPECIAL_TOKENS,
    SYSTEM,
    USER,
    clone_encoding,
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from tests.helpers.project import ROOT

SAMPLE = (
    "En un lugar de la Mancha, de cuyo nombre no quiero acordarme… ¿Sancho? ¡Señor! 1605 → 漢字 🙂\n\tend"
)


@pytest.fixture(scope="module")
def trained(corpus_text) -> dict[str, tiktoken.Encoding]:
    return {kind: train_tokenizer(kind, [corpus_text[:60_000]], 512) for kind in ("bpe", "char", "gpt2")}


@pytest.mark.parametrize("kind", ["bpe", "char", "gpt2"])
def test_round_trip_and_special_tokens(trained, corpus_text, kind):
    enc = trained[kind]
    assert isinstance(enc, tiktoken.Encoding)
    for text in (SAMPLE, corpus_text[100_000:104_000], ""):
        assert enc.decode(enc.encode_ordinary(text)) == text
    ids = {t: enc.encode_single_token(t) for t in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert enc.eot_token == ids[EOT]
    assert max(ids.values()) < enc.n_vocab
    chat = f"{SYSTEM}be brief{END_OF_TURN}{USER}hola{END_OF_TURN}{ASSISTANT}"
    encoded = enc.encode(chat, allowed_special="all")
    assert ids[ASSISTANT] == encoded[-1] and enc.decode(encoded) == chat
    # Special-token text inside ordinary text stays ordinary text.
    assert ids[EOT] not in enc.encode_ordinary(f"a {EOT} b")


def test_bpe_vocab_size_counts_special_tokens(trained):
    assert trained["bpe"].n_vocab == 512
    assert trained["bpe"].eot_token == 512 - len(SPECIAL_TOKENS)


def test_bpe_training_is_deterministic(corpus_text, tmp_path):
    fingerprints = {
        save_tokenizer(train_tokenizer("bpe", [corpus_text[:30_000]], 400), tmp_path / str(i), "bpe")
        for i in range(2)
    }
    assert len(fingerprints) == 1


def test_bpe_compresses_better_than_char(trained, corpus_text):
    text = corpus_text[120_000:140_000]
    assert len(trained["bpe"].encode_ordinary(text)) < 0.6 * len(trained["char"].encode_ordinary(text))


def test_gpt2_matches_the_published_gpt2_ids(trained):
    enc = trained["gpt2"]
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.eot_token == 50256
    assert enc.n_vocab == 50257 + len(SPECIAL_TOKENS) - 1


def test_char_gives_one_token_per_seen_character(trained, corpus_text):
    enc = trained["char"]
    text = corpus_text[:2000]
    assert len(enc.encode_ordinary(text)) == len(text)
    unseen = "漢"  # not in the training text: falls back to its 3 UTF-8 bytes
    assert len(enc.encode_ordinary(unseen)) == 3


@pytest.mark.parametrize("kind", ["bpe", "char", "gpt2"])
def test_save_load_round_trip(trained, tmp_path, kind):
    enc = trained[kind]
    fingerprint = save_tokenizer(enc, tmp_path, kind)
    loaded = load_tokenizer(tmp_path)
    assert tokenizer_fingerprint(tmp_path) == fingerprint
    assert loaded.n_vocab == enc.n_vocab and loaded.eot_token == enc.eot_token
    assert loaded.encode(SAMPLE + EOT, allowed_special="all") == enc.encode(
        SAMPLE + EOT, allowed_special="all"
    )
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["kind"] == kind and meta["vocab_size"] == enc.n_vocab and meta["fingerprint"] == fingerprint
    assert meta["special_tokens"][ASSISTANT] == enc.encode_single_token(ASSISTANT)


@pytest.mark.parametrize("kind", ["bpe", "char", "gpt2"])
def test_a_clone_is_the_same_tokenizer_in_a_new_object(trained, tmp_path, kind):
    enc = trained[kind]
    clone = clone_encoding(enc)
    assert clone is not enc and clone._core_bpe is not enc._core_bpe  # its own regexes, so its own caches
    assert (clone.n_vocab, clone.eot_token, clone.name) == (enc.n_vocab, enc.eot_token, enc.name)
    text = SAMPLE + EOT + SAMPLE
    assert clone.encode(text, allowed_special={EOT}) == enc.encode(text, allowed_special={EOT})
    assert save_tokenizer(clone, tmp_path / "clone", kind) == save_tokenizer(enc, tmp_path / "enc", kind)


def test_edited_rank_file_is_refused(trained, tmp_path):
    save_tokenizer(trained["bpe"], tmp_path, "bpe")
    ranks = tmp_path / RANKS_FILE
    lines = ranks.read_bytes().splitlines(keepends=True)
    ranks.write_bytes(b"".join(lines[:-1]))
    with pytest.raises(PipelineError, match=RANKS_FILE):
        load_tokenizer(tmp_path)
    with pytest.raises(PipelineError, match="fingerprint"):
        tokenizer_fingerprint(tmp_path)


def test_missing_tokenizer_names_the_file(tmp_path):
    with pytest.raises(PipelineError, match="metadata.json"):
        load_tokenizer(tmp_path / "nowhere")


def test_unknown_kind_is_refused():
    with pytest.raises(PipelineError, match="tokenizer.kind"):
        train_tokenizer("wordpiece", ["text"], 512)


def test_loading_imports_no_torch_and_no_network(trained, tmp_path):
    save_tokenizer(trained["gpt2"], tmp_path, "gpt2")
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "from pipeline.data.tokenizer import load_tokenizer, train_tokenizer\n"
        "import pipeline.data.shards\n"
        f"enc = load_tokenizer({str(tmp_path)!r})\n"
        "assert train_tokenizer('gpt2', [], 0).encode_ordinary('Hello world') == [15496, 995]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(enc.n_vocab)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(trained["gpt2"].n_vocab)
