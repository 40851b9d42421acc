"""Template native gives transformers' own ids: a real tokenizer.json (trained by `tokenizers` on the Quijote, the
family's pre-tokenizer and special tokens) with a tokenizer_config.json holding a ChatML template (SmolLM2's
shape), a Llama 3 one (bos_token, headers, strftime_now, trimmed contents) or a Qwen3 one (reasoning blocks,
enable_thinking=False), read as the tokenize stage reads it; ``AutoTokenizer.from_pretrained`` on the same
directory renders and tokenizes every conversation (system turn, several turns, non-ASCII text) to the same ids:
the generation prompt, and the prompt followed by the answer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pipeline.data import tokenizer_json
from pipeline.data.prompts import chat_prompt_ids, encode_prompt, encode_response, resolve
from tests.helpers.hf_tokenizers import CHAT_TEMPLATES, CHATML, LLAMA3_SPECIALS, trained, write_config

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
