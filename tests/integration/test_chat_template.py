"""Template native gives transformers' own ids: a real tokenizer.json (trained by `tokenizers` on the Quijote, the
family's pre-tokenizer and special tokens) with a tokenizer_config.json holding a ChatML template (SmolLM2's
shape), a Llama 3 one (bos_token, headers, strftime_now, trimmed contents) or a Qwen3 one (reasoning blocks,
enable_thinking=False), read as the tokenize stage reads it; ``AutoTokenizer.from_pretrained`` on the same
directory renders and tokenizes every conversation (system turn, several turns, non-ASCII text) to the same ids:
the generation prompt, and the prompt followed by the answer. The ONNX export of a model tuned in such a template
serves in it from the export alone."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from pipeline.common.config import ExportParams
from pipeline.data import tokenizer_json
from pipeline.data.prompts import chat_prompt_ids, encode_prompt, encode_response, resolve
from pipeline.data.shards import Segment, write_shards
from pipeline.data.tokenizer import load_tokenizer
from pipeline.export.onnx import export_model
from pipeline.model.sampling import SamplingOptions
from pipeline.serve.served_model import load_model_dir
from tests.helpers.hf_tokenizers import CHAT_TEMPLATES, CHATML, LLAMA3_SPECIALS, trained, write_config
from tests.helpers.project import generated_corpus
from tests.helpers.serving import save_native_model

CONVERSATIONS = [
    [("user", "¿Quién es Dulcinea?")],
    [("system", "Responde en una frase."), ("user", "En un lugar de la Mancha…")],
    [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "  Hello, how can I help?  "),
        ("user", "Name a colour 🎨 (ñ, ü, 漢字)."),
    ],
    [
        ("user", "First"),
        ("assistant", "One."),
        ("user", "Second\n\nwith a blank line"),
        ("assistant", "Two."),
        ("user", "Third"),
    ],
]
ANSWERS = ["Sí, señor.", "  A trimmed answer.\n", "Rojo 🔴"]
# template → (pre-tokenizer, special tokens, special tokens first in the vocabulary)
BASES = {
    "chatml": ("smollm2", CHATML, True),
    "llama3": ("llama3", LLAMA3_SPECIALS, False),
    "qwen3": ("qwen", CHATML, False),
}


@pytest.fixture(scope="module", params=list(BASES))
def base(request, corpus_text, tmp_path_factory):
    name = request.param
    pre, specials, first = BASES[name]
    root = tmp_path_factory.mktemp(name)
    trained(corpus_text[:100_000], pre, specials, root, 800, specials_first=first)
    write_config(root, *CHAT_TEMPLATES[name])
    enc, meta = tokenizer_json.load_checked(str(root), None, [corpus_text[100_000:120_000]])
    template = resolve("native", meta, enc, "sft.template")
    return name, enc, template, AutoTokenizer.from_pretrained(root)


def _theirs(tokenizer, messages, **kwargs) -> list[int]:
    chat = [{"role": role, "content": content} for role, content in messages]
    return tokenizer.apply_chat_template(
        chat, tokenize=True, return_dict=False, enable_thinking=False, **kwargs
    )


def test_prompts_and_answers_equal_apply_chat_template(base):
    name, enc, template, tokenizer = base
    assert template.stop == {"llama3": "<|eot_id|>"}.get(name, "<|im_end|>")
    for messages in CONVERSATIONS:
        ours = chat_prompt_ids(enc, template, messages)
        assert ours == _theirs(tokenizer, messages, add_generation_prompt=True), (name, messages)
        *context, (_, last) = messages
        assert encode_prompt(enc, last, "", template, context) == ours
        for answer in ANSWERS:
            full = ours + encode_response(enc, answer, template, last, "", context)
            assert full == _theirs(tokenizer, [*messages, ("assistant", answer)]), (name, messages, answer)


def test_an_instruction_with_input_is_one_user_message(base):
    _, enc, template, tokenizer = base
    ids = encode_prompt(enc, "Traduce al inglés.", "El ingenioso hidalgo", template)
    expected = _theirs(
        tokenizer, [("user", "Traduce al inglés.\n\nEl ingenioso hidalgo")], add_generation_prompt=True
    )
    assert ids == expected


def test_the_onnx_export_of_a_native_model_serves_in_the_bases_template(tmp_path):
    """A Llama-family model tuned in its base's ChatML template, exported to ONNX: served from the export alone, it
    renders a conversation to transformers' ids and answers as the torch model does, stopping at <|im_end|>."""
    model_dir = save_native_model(
        tmp_path / "sft", {"What is red?": "A colour.", "Name a fruit.": "An apple."}, steps=40
    )
    recorded = json.loads((model_dir / "config.json").read_text())["tokenizer"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_corpus(20_000), encoding="utf-8")
    half = corpus.stat().st_size // 2
    segments = {"train": [Segment(0, half)], "val": [Segment(half, corpus.stat().st_size - half)]}
    enc = load_tokenizer(recorded["path"])
    write_shards(
        enc,
        corpus,
        segments,
        tmp_path / "shards",
        fingerprint=recorded["fingerprint"],
        shard_tokens=10**6,
        batch_bytes=10**6,
    )
    metrics = export_model(
        model_dir, recorded["path"], tmp_path / "shards", tmp_path / "onnx", ExportParams(), 0
    )
    assert metrics["parity"]["passed"]
    onnx_model, torch_model = load_model_dir("onnx", tmp_path / "onnx"), load_model_dir("sft", model_dir)
    conversation = [
        ("system", "Be brief."),
        ("user", "What is red?"),
        ("assistant", "A colour."),
        ("user", "Name a fruit."),
    ]
    theirs = AutoTokenizer.from_pretrained(tmp_path / "sft-base").apply_chat_template(
        [{"role": role, "content": content} for role, content in conversation],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    ids = onnx_model.chat_ids(conversation)
    assert ids == list(theirs) == torch_model.chat_ids(conversation)
    stop = enc.encode_single_token("<|im_end|>")
    assert stop in onnx_model.stop_ids
    opts = SamplingOptions(max_new_tokens=12, temperature=0, eos_id=stop)
    answer = list(onnx_model.tokens.stream(ids, opts))
    assert answer == list(torch_model.tokens.stream(ids, opts))
