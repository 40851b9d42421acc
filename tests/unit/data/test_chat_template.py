"""A base's own chat template (template native): read from tokenizer_config.json beside a real tokenizer.json
(trained by `tokenizers`), split into prompt and answer, with its stop token; each thing that cannot work is one
line naming the file or the param. (Equality with transformers' apply_chat_template: tests/integration.)"""

from __future__ import annotations

import json

import pytest

from pipeline.common.errors import PipelineError
from pipeline.data import chat_template, tokenizer_json
from pipeline.data.prompts import (
    chat_prompt_ids,
    decode_response,
    encode_prompt,
    encode_response,
    format_prompt,
    resolve,
    stop_id,
)
from pipeline.data.tokenizer import END_OF_TURN
from tests.helpers.hf_tokenizers import CHAT_TEMPLATES, CHATML, trained, write_config


@pytest.fixture(scope="module")
def base(corpus_text, tmp_path_factory):
    """A SmolLM2-like tokenizer.json (ChatML tokens first) and its tokenizer metadata, as the tokenize stage
    records it."""
    root = tmp_path_factory.mktemp("base")
    path = trained(corpus_text[:60_000], "smollm2", CHATML, root, 600, specials_first=True)
    enc, meta = tokenizer_json.read(path)
    return root, enc, meta


def _meta(base, template, bos=None, eos=None) -> dict:
    root, _, meta = base
    return {
        **meta,
        "source": str(root),
        "chat_template": chat_template.read_config(write_config(root, template, bos, eos)),
    }


def test_chatml_prompt_answer_and_stop(base):
    _, enc, _ = base
    template = resolve("native", _meta(base, *CHAT_TEMPLATES["chatml"]), enc, "sft.template")
    assert template.stop == "<|im_end|>" and template.tokens == {"eos_token": "<|im_end|>"}
    context = (("system", "Sé breve."),)
    prompt = format_prompt("¿Qué es?", "Un molino", template, context)
    assert prompt == (
        "<|im_start|>system\nSé breve.<|im_end|>\n<|im_start|>user\n¿Qué es?\n\nUn molino<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = encode_prompt(enc, "¿Qué es?", "Un molino", template, context)
    assert ids == enc.encode(prompt, allowed_special={"<|im_start|>", "<|im_end|>", "<|endoftext|>"})
    answer = encode_response(enc, "Un gigante.", template, "¿Qué es?", "Un molino", context)
    assert enc.decode(answer) == "Un gigante.<|im_end|>\n"
    assert answer[-2] == stop_id(enc, template) == enc.encode_single_token("<|im_end|>")
    assert decode_response(enc, answer, template) == "Un gigante."
    # a chat conversation ending with the user: the same prompt as the instruction's
    turns = [*context, ("user", "¿Qué es?\n\nUn molino")]
    assert chat_prompt_ids(enc, template, turns) == ids
    # our own markers in the text stay text (the base's tokenizer does not know them)
    marked = encode_prompt(enc, f"say {END_OF_TURN}", "", template)
    assert enc.encode_single_token(END_OF_TURN) not in marked


def test_a_list_of_named_templates_takes_the_default(base):
    _, enc, _ = base
    named = [
        {"name": "tool_use", "template": "{{ raise_exception('tools') }}"},
        {"name": "default", "template": CHAT_TEMPLATES["chatml"][0]},
    ]
    template = resolve("native", _meta(base, named, eos="<|im_end|>"), enc, "sft.template")
    assert template.stop == "<|im_end|>"


def _error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_list_without_default_is_one_line(base):
    root, _, _ = base
    path = write_config(root, [{"name": "tool_use", "template": "x"}])
    with pytest.raises(PipelineError) as exc:
        chat_template.read_config(path)
    assert _error(exc) == (
        f"{path}: chat_template is a list of named templates without a 'default' (it has ['tool_use'])"
    )


def test_no_template_with_native_names_the_file_and_the_param(base, tmp_path):
    root, enc, meta = base
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert chat_template.read_config(tmp_path / "tokenizer_config.json") is None
    with pytest.raises(PipelineError) as exc:
        resolve("native", {**meta, "source": str(root)}, enc, "sft.template")
    assert _error(exc) == (
        f"sft.template=native: {root} has no chat_template in its tokenizer_config.json (tokenizer.kind hf reads "
        "it beside tokenizer.json); choose template alpaca or chat"
    )


def test_a_template_that_raises_is_one_line(base):
    root, enc, _ = base
    template = "{{ raise_exception('Only user and assistant roles are supported!') }}"
    with pytest.raises(PipelineError) as exc:
        resolve("native", _meta(base, template), enc, "sft.template")
    assert _error(exc) == (
        f"{root / 'tokenizer_config.json'}: chat_template raised: Only user and assistant roles are supported!"
    )


def test_invalid_jinja_is_one_line(base):
    root, enc, _ = base
    with pytest.raises(PipelineError) as exc:
        resolve("native", _meta(base, "{% for m in messages %}"), enc, "sft.template")
    assert _error(exc).startswith(f"{root / 'tokenizer_config.json'}: chat_template is not valid Jinja (")


def test_a_render_that_is_not_prompt_then_content_is_refused(base):
    root, enc, _ = base
    # the answer's content is written before the assistant header: no prompt + content + suffix split
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(PipelineError) as exc:
        resolve("native", _meta(base, template), enc, "sft.template")
    message = _error(exc)
    assert message.startswith(
        f"{root / 'tokenizer_config.json'}: chat_template does not render a conversation as"
    )
    assert message.endswith("template native cannot split prompt from answer")


def test_an_answer_that_ends_without_a_special_token_is_refused(base):
    root, enc, _ = base
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(PipelineError) as exc:
        resolve("native", _meta(base, template), enc, "sft.template")
    assert _error(exc) == (
        f"{root / 'tokenizer_config.json'}: chat_template ends an answer with '\\n', which holds no special token "
        "to stop at"
    )


def test_a_changed_template_is_refused_by_its_sha256(base):
    _, enc, _ = base
    meta = _meta(base, *CHAT_TEMPLATES["chatml"])
    meta["chat_template"]["template"] += " "
    with pytest.raises(PipelineError, match="does not match its sha256$"):
        resolve("native", meta, enc, "sft.template")


def test_the_tokenizer_source_finds_the_config_beside_tokenizer_json(base):
    root, _, _ = base
    write_config(root, *CHAT_TEMPLATES["llama3"])
    assert (
        tokenizer_json.resolve(str(root), None, chat_template.CONFIG_FILE) == root / "tokenizer_config.json"
    )
    assert tokenizer_json.resolve(str(root / "tokenizer.json"), None, chat_template.CONFIG_FILE) == (
        root / "tokenizer_config.json"
    )
    record = chat_template.read_config(root / "tokenizer_config.json")
    assert record["bos_token"] == "<|begin_of_text|>" and record["eos_token"] == "<|eot_id|>"
