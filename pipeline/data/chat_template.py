"""A base's own chat template (``tokenizer_config.json``'s ``chat_template``: template ``native``), rendered and
tokenized as transformers' ``apply_chat_template(tokenize=True)`` does.

- Read: the template text (a string, or the ``default`` of a list of named templates) and the special tokens the
  template sees (``bos_token``, ``eos_token``…), recorded in the tokenizer's metadata.json with its sha256.
- Rendered: Jinja's ImmutableSandboxedEnvironment with ``trim_blocks`` and ``lstrip_blocks``, ``loopcontrols``,
  ``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML, a pass-through ``generation``
  block; messages, ``add_generation_prompt``, ``tools``/``documents`` (None) and ``enable_thinking=False``: the
  pipeline trains and serves answers without reasoning blocks (Qwen3's non-thinking mode; other templates
  ignore the variable).
- Tokenized: the rendered text with the base's own added tokens as their ids (as ``tokenizers`` splits them out),
  everything else as text; no BOS beyond what the template writes.
- Prompt and answer: the prompt is the render with ``add_generation_prompt``; the answer is what the full
  conversation adds after it (the content, then the template's end-of-turn text). The stop token is the first
  special token in that end-of-turn text.

It knows nothing of instruction records or models; pipeline/data/prompts.py decides when a template is native.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import tiktoken

from pipeline.common.errors import PipelineError
from pipeline.common.json_files import read_json

NAME = "native"
CONFIG_FILE = "tokenizer_config.json"
TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
)  # what transformers' special_tokens_map passes
# Rendering a conversation to find the template's end-of-turn text (any text would do)
PROBE = ((("user", "Hi"),), "Hello")

Message = tuple[str, str]  # (role, content)


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken mapping."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_config(path: Path) -> dict | None:
    """What metadata.json records of ``path`` (a tokenizer_config.json): the template, its sha256 and the special
    tokens it sees; None when the file holds no chat template."""
    data = read_json(path, CONFIG_FILE)
    template = data.get("chat_template")
    if template is None:
        return None
    if isinstance(
        template, list
    ):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use"…}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if not isinstance(named.get("default"), str):
            raise PipelineError(
                f"{path}: chat_template is a list of named templates without a 'default' "
                f"(it has {sorted(str(name) for name in named)})"
            )
        template = named["default"]
    if not isinstance(template, str) or not template:
        raise PipelineError(f"{path}: chat_template must be a string or a list of named templates")
    tokens = {key: text for key in TOKEN_KEYS if (text := _token_text(data.get(key))) is not None}
    return {
        "file": str(path),
        "template": template,
        "sha256": hashlib.sha256(template.encode()).hexdigest(),
        **tokens,
    }


@lru_cache(maxsize=1)
def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        # transformers' {% generation %} marks the assistant's tokens for a mask; here its body renders as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # as transformers: no HTML escaping, and its options exposed
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env


@lru_cache(maxsize=8)
def _compiled(template: str, origin: str):
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.exceptions.TemplateError as exc:
        raise PipelineError(f"{origin}: chat_template is not valid Jinja ({exc})") from None


@dataclass(frozen=True)
class ChatTemplate:
    """A base's chat template, ready to render conversations into ``enc``'s ids."""

    template: str
    sha256: str
    tokens: dict[str, str]  # bos_token, eos_token…: the names the template reads
    added: frozenset[str]  # the base's added tokens: ids when they appear in the rendered text
    stop: str  # the end-of-turn token generation stops at
    origin: str  # the tokenizer_config.json it came from, for error lines

    name = NAME

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return _compiled(self.template, self.origin).render(
                messages=[{"role": role, "content": content} for role, content in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=False,
                **self.tokens,
            )
        except jinja2.exceptions.TemplateError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PipelineError(f"{self.origin}: chat_template raised: {first}") from None

    def encode(self, enc: tiktoken.Encoding, text: str) -> list[int]:
        """Rendered text → ids: the base's added tokens as themselves, the rest (our markers too) as text."""
        return enc.encode(text, allowed_special=self.added, disallowed_special=())

    def answer_text(self, messages: Sequence[Message], answer: str) -> tuple[str, str, str]:
        """(prompt, content as rendered, end-of-turn text) of ``messages`` answered by ``answer``; refused in one
        line when the full render is not the prompt, then the content, then a suffix."""
        return _split(self, tuple(messages), answer)

    def prompt_ids(self, enc: tiktoken.Encoding, messages: Sequence[Message]) -> list[int]:
        return self.encode(enc, self.render(messages, add_generation_prompt=True))

    def answer_ids(self, enc: tiktoken.Encoding, messages: Sequence[Message], answer: str) -> list[int]:
        """The ids the answer adds after the prompt: its content and the template's end-of-turn text."""
        _, content, suffix = self.answer_text(messages, answer)
        return self.encode(enc, content + suffix)

    def stop_id(self, enc: tiktoken.Encoding) -> int:
        return enc.encode_single_token(self.stop)

    def record(self) -> dict:
        """What a model directory records of the template it was tuned with."""
        return {"chat_template_sha256": self.sha256, "stop_token": self.stop}


def _split(template: ChatTemplate, messages: tuple[Message, ...], answer: str) -> tuple[str, str, str]:
    prompt = template.render(messages, add_generation_prompt=True)
    full = template.render((*messages, ("assistant", answer)), add_generation_prompt=False)
    rest = full[len(prompt) :] if full.startswith(prompt) else None
    # the content as the template writes it: as given, or trimmed (Llama 3's template trims every message)
    content = next((c for c in (answer, answer.strip()) if rest is not None and rest.startswith(c)), None)
    if rest is None or content is None:
        raise PipelineError(
            f"{template.origin}: chat_template does not render a conversation as its generation prompt followed by "
            f"the answer's content (prompt ends {prompt[-40:]!r}, full conversation there {full[len(prompt) - 40 :][:80]!r}); "
            "template native cannot split prompt from answer"
        )
    return prompt, content, rest[len(content) :]


def load(meta: dict, enc: tiktoken.Encoding, param: str) -> ChatTemplate:
    """The chat template a tokenizer's metadata.json records (``chat_template``), checked: it renders, splits
    prompt from answer, and ends an answer with a special token; ``param`` names the setting that asked for it."""
    record = meta.get("chat_template")
    source = meta.get("source") or "the tokenizer"
    if not isinstance(record, dict) or not isinstance(record.get("template"), str):
        raise PipelineError(
            f"{param}={NAME}: {source} has no chat_template in its {CONFIG_FILE} (tokenizer.kind hf reads it beside "
            "tokenizer.json); choose template alpaca or chat"
        )
    origin = record.get("file") or f"{source}/{CONFIG_FILE}"
    if hashlib.sha256(record["template"].encode()).hexdigest() != record.get("sha256"):
        raise PipelineError(
            f"{origin}: the chat_template recorded in metadata.json does not match its sha256"
        )
    model_tokens = meta.get("model_tokens", enc.n_vocab)
    added = frozenset(t for t in enc.special_tokens_set if enc.encode_single_token(t) < model_tokens)
    tokens = {k: record[k] for k in TOKEN_KEYS if isinstance(record.get(k), str)}
    probe = ChatTemplate(record["template"], record["sha256"], tokens, added, "", origin)
    _, _, suffix = probe.answer_text(*PROBE)
    added_ids = {enc.encode_single_token(t): t for t in added}
    specials = [added_ids[t] for t in probe.encode(enc, suffix) if t in added_ids]
    if not specials:
        raise PipelineError(
            f"{origin}: chat_template ends an answer with {suffix!r}, which holds no special token to stop at"
        )
    return ChatTemplate(record["template"], record["sha256"], tokens, added, specials[0], origin)
