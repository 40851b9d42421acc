"""A model's tokenizer.json as our tiktoken tokenizer: real byte-level BPEs trained with the `tokenizers` library on
the Quijote (the pre-tokenizers of Llama 3, Qwen, GPT-2 and SmolLM2; ChatML- and Llama-3-style special tokens)
give the `tokenizers` library's own ids; what cannot be reproduced is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, normalizers

from pipeline.common.errors import PipelineError
from pipeline.data import tokenizer_json
from pipeline.data.tokenizer import EOT, SPECIAL_TOKENS
from tests.helpers.hf_tokenizers import CHATML, LLAMA3_SPECIALS, trained


@pytest.mark.parametrize(
    ("pre", "specials", "first"),
    [
        ("llama3", LLAMA3_SPECIALS, False),
        ("qwen", CHATML, False),
        ("gpt2", CHATML, True),
        ("smollm2", CHATML, True),
    ],
)
def test_a_trained_tokenizer_json_gives_the_tokenizers_ids_on_the_quijote(
    corpus_text, tmp_path, pre, specials, first
):
    path = trained(corpus_text[:100_000], pre, specials, tmp_path, specials_first=first)
    enc, meta = tokenizer_json.read(path)
    texts = [*tokenizer_json.EDGE_TEXTS, corpus_text[100_000:]]  # text it was not trained on
    assert tokenizer_json.check_same_ids(enc, path, texts) == sum(map(len, texts))
    reference = Tokenizer.from_file(str(path))
    chat = f"{specials[1]}user\nHola, ¿qué tal?{specials[-1]}\n"
    assert enc.encode(chat, allowed_special="all") == reference.encode(chat, add_special_tokens=False).ids
    # the model's special tokens keep their ids; ours come after every id the model has
    assert all(enc.encode_single_token(s) == reference.token_to_id(s) for s in specials)
    ours = [enc.encode_single_token(s) for s in SPECIAL_TOKENS if s not in specials]
    assert min(ours) == reference.get_vocab_size() and enc.n_vocab == reference.get_vocab_size() + len(ours)
    assert meta["model_tokens"] == reference.get_vocab_size() and enc.encode_single_token(EOT) >= 0


def _edit(path: Path, change) -> Path:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def _swap_two_merges(data: dict) -> None:
    merges = data["model"]["merges"]
    merges[10], merges[11] = merges[11], merges[10]


BAD = {
    "normalizer": (
        lambda d: d.update(normalizer=json.loads(normalizers.NFC().__getstate__())),
        "a normalizer (NFC) is not supported",
    ),
    "prefix space": (
        lambda d: d["pre_tokenizer"].update(add_prefix_space=True),
        "pre_tokenizer ['ByteLevel'] is not a byte-level split this pipeline reproduces",
    ),
    "merge order": (_swap_two_merges, "does not make tokens in id order, so ids are not ranks"),
    "not bpe": (
        lambda d: d["model"].update(type="WordPiece"),
        "model 'WordPiece' is not a plain byte-level BPE",
    ),
    "lost byte": (lambda d: d["model"]["vocab"].pop("Ā"), "the vocabulary lacks 1 of the 256 bytes (e.g. 0)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_what_cannot_be_reproduced_is_refused_in_one_line(corpus_text, tmp_path, case):
    change, message = BAD[case]
    path = _edit(trained(corpus_text[:20_000], "gpt2", CHATML, tmp_path, 400), change)
    with pytest.raises(PipelineError) as exc:
        tokenizer_json.read(path)
    assert message in str(exc.value) and str(exc.value).startswith(str(path)) and "\n" not in str(exc.value)


def test_a_split_the_conversion_cannot_reproduce_is_caught_on_text(corpus_text, tmp_path):
    """A tokenizer.json whose regex tiktoken reads otherwise: the ids differ on text, and the check says where."""
    path = trained(corpus_text[:20_000], "gpt2", CHATML, tmp_path, 400)
    enc, _ = tokenizer_json.read(path)
    one_char = {"type": "Split", "pattern": {"Regex": r"\S|\s+"}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    _edit(
        path, lambda d: d.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [one_char, byte_level]})
    )
    with pytest.raises(PipelineError, match="differently from tokenizers at token"):
        tokenizer_json.check_same_ids(enc, path, ["uno dos tres cuatro"])


def test_source_must_hold_a_tokenizer_json(tmp_path):
    assert tokenizer_json.resolve(
        str(trained("abc abd", "gpt2", CHATML, tmp_path / "m", 300).parent)
    ).is_file()
    for source in (str(tmp_path / "missing"), "no-slash-name", "a/b/c"):
        with pytest.raises(PipelineError, match=f"tokenizer.source={source}: no tokenizer.json there"):
            tokenizer_json.resolve(source)
