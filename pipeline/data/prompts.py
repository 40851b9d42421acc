"""Prompt templates: how an instruction, a conversation and an answer become the text and token ids a model sees.

``alpaca`` is the prompt of "Build a Large Language Model (From Scratch)" ch07; ``chat`` wraps each turn in the
tokenizer's reserved markers (<|system|>, <|user|>, <|assistant|> … <|end|>); both end every response with EOT.
``native`` is a base's own chat template (a ``ChatTemplate`` from pipeline/data/chat_template.py, passed where
the others pass their name): its answers end with the template's end-of-turn text, and generation stops at its
end-of-turn token. One definition for training, evaluation, serving and the exports' templates. No torch (the
server's ONNX path renders prompts here); it knows nothing of the records instructions come from
(pipeline/data/instructions.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import tiktoken

from pipeline.common.errors import PipelineError
from pipeline.data import chat_template
from pipeline.data.chat_template import ChatTemplate
from pipeline.data.tokenizer import ASSISTANT, END_OF_TURN, SYSTEM, USER

TEMPLATES = ("alpaca", "chat", chat_template.NAME)
ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ROLE_MARKERS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

Message = tuple[str, str]  # (role, content)
Template = str | ChatTemplate  # a template's name, or the base's own template (native)


def resolve(name: str, tokenizer_meta: dict, enc: tiktoken.Encoding, param: str) -> Template:
    """The template ``param`` names: ``native`` becomes the tokenizer's own chat template (checked), the others
    stay names."""
    if name == chat_template.NAME:
        return chat_template.load(tokenizer_meta, enc, param)
    return name


def template_name(template: Template | None) -> str | None:
    return template.name if isinstance(template, ChatTemplate) else template


def conversation(instruction: str, input: str = "", context: Sequence[Message] = ()) -> list[Message]:
    """An instruction as a conversation: the earlier turns, then the user's message (the input after a blank
    line: chat templates have no separate input field)."""
    return [*context, ("user", f"{instruction}\n\n{input}" if input else instruction)]


def _prompt_segments(
    instruction: str, input: str, template: str, context: Sequence[Message]
) -> list[tuple[str, bool]]:
    """The prompt as (text, is_special_token) pieces, so text and token ids are built from one definition."""
    if template == "alpaca":
        if context:
            raise PipelineError(
                "template 'alpaca' cannot render a chat with a system message or earlier turns; use template: chat"
            )
        text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
        if input:
            text += f"\n\n### Input:\n{input}"
        return [(text + "\n\n### Response:\n", False)]
    if template == "chat":
        segments = []
        for role, content in conversation(instruction, input, context):
            segments += [(ROLE_MARKERS[role], True), (content, False), (END_OF_TURN, True)]
        return segments + [(ASSISTANT, True)]  # the open assistant turn the answer continues
    raise PipelineError(f"unknown instruction template {template!r} (known: {', '.join(TEMPLATES)})")


def format_prompt(
    instruction: str, input: str = "", template: Template = "alpaca", context: Sequence[Message] = ()
) -> str:
    """The prompt text a model sees before its answer; the Alpaca one ends with '### Response:\\n'."""
    if isinstance(template, ChatTemplate):
        return template.render(conversation(instruction, input, context), add_generation_prompt=True)
    return "".join(text for text, _ in _prompt_segments(instruction, input, template, context))


def _special_id(enc: tiktoken.Encoding, marker: str, template: str) -> int:
    try:
        return enc.encode_single_token(marker)
    except KeyError:
        raise PipelineError(
            f"tokenizer '{enc.name}' has no {marker} token, which template '{template}' needs"
        ) from None


def encode_prompt(
    enc: tiktoken.Encoding,
    instruction: str,
    input: str = "",
    template: Template = "alpaca",
    context: Sequence[Message] = (),
) -> list[int]:
    """Token ids of ``format_prompt``: user text is encoded as ordinary text, markers as their special ids.

    (Text that merely looks like a marker, e.g. a literal '<|end|>' in an instruction, stays text; a native
    template's render is tokenized as transformers tokenizes it: the base's added tokens are ids wherever they are.)
    """
    if isinstance(template, ChatTemplate):
        return template.prompt_ids(enc, conversation(instruction, input, context))
    ids: list[int] = []
    for text, special in _prompt_segments(instruction, input, template, context):
        ids += [_special_id(enc, text, template)] if special else enc.encode_ordinary(text)
    return ids


def encode_response(
    enc: tiktoken.Encoding,
    text: str,
    template: Template = "alpaca",
    instruction: str = "",
    input: str = "",
    context: Sequence[Message] = (),
) -> list[int]:
    """An answer as the model must produce it: the text, <|end|> for the chat template, then EOT; for a native
    template, what the conversation (``instruction``, ``input``, ``context``) answered by ``text`` adds after
    the prompt: the content and the template's end-of-turn text."""
    if isinstance(template, ChatTemplate):
        return template.answer_ids(enc, conversation(instruction, input, context), text)
    ids = enc.encode_ordinary(text)
    if template == "chat":
        ids.append(_special_id(enc, END_OF_TURN, template))
    return ids + [enc.eot_token]  # EOT: learnt, so generation knows where to stop


def stop_id(enc: tiktoken.Encoding, template: Template | None) -> int:
    """The token generation stops at: a native template's end-of-turn token, else EOT."""
    return template.stop_id(enc) if isinstance(template, ChatTemplate) else enc.eot_token


def decode_response(enc: tiktoken.Encoding, ids: Sequence[int], template: Template | None = None) -> str:
    """Generated ids → answer text, cut at the first EOT or end-of-turn marker (a native template's too)."""
    stops = {enc.eot_token, stop_id(enc, template)}
    if END_OF_TURN in enc.special_tokens_set:
        stops.add(enc.encode_single_token(END_OF_TURN))
    kept = []
    for token in ids:
        if token in stops:
            break
        kept.append(token)
    return enc.decode(kept).strip()


def chat_prompt_ids(
    encoding: tiktoken.Encoding, template: Template | None, messages: Sequence[tuple[str, str]]
) -> list[int]:
    """Prompt ids for a conversation of (role, content) that ends with a user message.

    ``chat`` models see every turn in their markers, ``native`` ones the conversation in the base's template;
    ``alpaca`` models (single-turn by design) get the last user message as the instruction and the earlier turns,
    as a transcript, in the ``### Input:`` field; base models (no template) continue the messages' text joined by
    blank lines.
    """
    if template is None:
        return encoding.encode_ordinary("\n\n".join(content for _, content in messages))
    if isinstance(template, ChatTemplate):
        return template.prompt_ids(encoding, messages)
    *context, (_, last) = messages
    if template == "chat":
        return encode_prompt(encoding, last, "", "chat", tuple(context))
    transcript = "\n".join(f"{role}: {content}" for role, content in context)
    return encode_prompt(encoding, last, transcript, template)
