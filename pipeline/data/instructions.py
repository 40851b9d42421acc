"""Instruction and preference data: records → examples → token ids → padded, masked batches.

Accepted records (a JSON array, or JSON Lines with one object per line):
  SFT          {"instruction", "input" (optional), "output"}  or  {"messages": [{"role", "content"}, ...]}
  preference   {"instruction", "input" (optional), "chosen", "rejected"},  {"prompt", "chosen", "rejected"},
               or chat pairs: {"prompt": [messages], "chosen": [assistant message], "rejected": [...]} or
               {"chosen": [whole conversation], "rejected": [whole conversation]} sharing all but the last turn.

The prompt templates live in pipeline/data/prompts.py; this module never imports torch: collation into tensors
lives with the objectives (pipeline/train/objectives.py).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import tiktoken

from pipeline.common.errors import PipelineError
from pipeline.data.prompts import ROLE_MARKERS, Message, Template, encode_prompt, encode_response

INSTRUCTION_FIELDS = (
    "instruction",
    "input",
    "output",
    "chosen",
    "rejected",
)  # the text a tokenizer learns from


@dataclass(frozen=True)
class Example:
    """An instruction and its reference answer; ``context`` holds a chat's turns before the last user message."""

    id: int
    instruction: str
    input: str
    output: str
    context: tuple[Message, ...] = ()

    @property
    def key(self) -> tuple:
        """What identifies the prompt, whichever file it came from (to keep held-out prompts out of training)."""
        return (self.context, self.instruction, self.input)


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) answer."""

    id: int
    instruction: str
    input: str
    chosen: str
    rejected: str
    context: tuple[Message, ...] = ()

    @property
    def key(self) -> tuple:
        return (self.context, self.instruction, self.input)


T = TypeVar("T")


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """Valid records, and one line per malformed record that was skipped (reported in the stage metrics)."""

    records: list[T]
    skipped: list[str] = field(default_factory=list)


class _Malformed(Exception):
    def __init__(self, field_name: str, problem: str):
        super().__init__(f"field '{field_name}' {problem}")


# ---------------------------------------------------------------------------------------------- reading records


def read_records(path: str | Path) -> list[object]:
    """The records of a JSON array or JSON Lines file; a JSONL line that does not parse is kept as an error marker."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: dataset file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is dropped
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise PipelineError(f"{path}: empty dataset")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        return [data]
    records: list[object] = []  # not one JSON document: JSON Lines
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            records.append(_Malformed("<line>", f"is not valid JSON ({exc.msg})"))
    return records


def _load(path: str | Path, parse: Callable[[int, object], T], strict: bool) -> Loaded[T]:
    raw = read_records(path)
    if not raw:
        raise PipelineError(f"{path}: empty dataset")
    records, skipped = [], []
    for index, record in enumerate(raw):
        try:
            # A JSONL line that did not parse: reported like any malformed record
            if isinstance(record, _Malformed):
                raise record
            records.append(parse(index, record))
        except _Malformed as exc:
            message = f"{path}: record {index}: {exc}"
            if strict:
                raise PipelineError(f"{message} (strict: true)") from None
            skipped.append(message)
    if not records:
        raise PipelineError(f"{path}: no valid records ({len(skipped)} skipped; first: {skipped[0]})")
    return Loaded(records, skipped)


def load_examples(path: str | Path, strict: bool = False) -> Loaded[Example]:
    """SFT examples from Alpaca or chat records; malformed ones fail (strict) or are skipped and listed."""
    return _load(path, _parse_example, strict)


def load_preferences(path: str | Path, strict: bool = False) -> Loaded[PreferencePair]:
    """Preference pairs; a pair whose chosen equals its rejected answer is malformed (it teaches nothing)."""
    return _load(path, _parse_preference, strict)


# ---------------------------------------------------------------------------------------------- parsing records


def _text(record: dict, name: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _Malformed(
            name, "is missing" if value is None else f"must be a string, got {type(value).__name__}"
        )
    if required and not value.strip():
        raise _Malformed(name, "is empty")
    return value


def _messages(value: object, name: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _Malformed(name, "must be a non-empty list of {role, content} messages")
    messages = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise _Malformed(where, "must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLE_MARKERS:
            raise _Malformed(f"{where}.role", f"must be one of {', '.join(ROLE_MARKERS)}, got {role!r}")
        if role == "system" and i > 0:
            raise _Malformed(f"{where}.role", "'system' is allowed only as the first message")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise _Malformed(f"{where}.content", "must be a non-empty string")
        messages.append((role, content))
    return messages


def _split_prompt(messages: list[Message], name: str) -> tuple[tuple[Message, ...], str]:
    """(earlier turns, last user message) of a conversation that must end with a user turn."""
    if messages[-1][0] != "user":
        last = len(messages) - 1
        raise _Malformed(
            f"{name}[{last}].role", f"the prompt must end with a user turn, got {messages[-1][0]!r}"
        )
    return tuple(messages[:-1]), messages[-1][1]


def _parse_example(index: int, record: object) -> Example:
    if not isinstance(record, dict):
        raise _Malformed("<record>", f"must be an object, got {type(record).__name__}")
    if "messages" in record:
        messages = _messages(record["messages"], "messages")
        if messages[-1][0] != "assistant":
            raise _Malformed(
                f"messages[{len(messages) - 1}].role", "the last message must be the assistant's answer"
            )
        if len(messages) < 2:
            raise _Malformed("messages", "needs a user turn before the assistant's answer")
        context, instruction = _split_prompt(messages[:-1], "messages")
        return Example(index, instruction, "", messages[-1][1], context)
    return Example(
        index, _text(record, "instruction"), _text(record, "input", required=False), _text(record, "output")
    )


def _answer(value: object, name: str) -> str:
    """A preference answer: a string, or a one-message assistant list (the TRL conversational format)."""
    if isinstance(value, list):
        messages = _messages(value, name)
        if len(messages) != 1 or messages[0][0] != "assistant":
            raise _Malformed(
                name, "must hold exactly one assistant message when 'prompt' is a list of messages"
            )
        return messages[0][1]
    return _text({name: value}, name)


def _parse_preference(index: int, record: object) -> PreferencePair:
    if not isinstance(record, dict):
        raise _Malformed("<record>", f"must be an object, got {type(record).__name__}")
    context: tuple[Message, ...] = ()
    input_text = ""
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        context, instruction = _split_prompt(_messages(prompt, "prompt"), "prompt")
        chosen, rejected = (
            _answer(record.get("chosen"), "chosen"),
            _answer(record.get("rejected"), "rejected"),
        )
    elif "prompt" in record:
        instruction = _text(record, "prompt")
        chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    elif isinstance(record.get("chosen"), list):
        chosen_turns = _messages(record["chosen"], "chosen")
        rejected_turns = _messages(record.get("rejected"), "rejected")
        for name, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
            if len(turns) < 2 or turns[-1][0] != "assistant":
                raise _Malformed(name, "must be a conversation ending with the assistant's answer")
        if chosen_turns[:-1] != rejected_turns[:-1]:
            raise _Malformed("rejected", "must share every turn but the last with 'chosen'")
        context, instruction = _split_prompt(chosen_turns[:-1], "chosen")
        chosen, rejected = chosen_turns[-1][1], rejected_turns[-1][1]
    else:
        instruction = _text(record, "instruction")
        input_text = _text(record, "input", required=False)
        chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    if chosen.strip() == rejected.strip():
        raise _Malformed("rejected", "is identical to 'chosen'")
    return PreferencePair(index, instruction, input_text, chosen, rejected, context)


# ---------------------------------------------------------------------------------------------- splitting


def instruction_texts(paths: list[Path]) -> Iterator[str]:
    """The text fields of the SFT/DPO records, so the BPE also learns the (English) instruction language."""
    for path in paths:
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PipelineError(f"{path}: cannot read instruction records ({exc})") from None
        for record in records if isinstance(records, list) else []:
            if isinstance(record, dict):
                yield from (v for k in INSTRUCTION_FIELDS if isinstance(v := record.get(k), str) and v)


def split_dataset(
    items: Sequence[T], train: float, val: float, seed: int, origin: str
) -> tuple[list[T], list[T], list[T]]:
    """Deterministic (train, val, test) split of a shuffled copy; a positive fraction always gets ≥ 1 item.

    The test fraction is what train and val leave over (default 85/5/10, as in the book's ch07).
    """
    test = 1.0 - train - val
    if train <= 0 or val < 0 or test < -1e-9:  # float slack: 1.0 - 0.9 - 0.1 is a hair below 0
        raise PipelineError(f"{origin}: split fractions train={train}, val={val} must be ≥ 0 and sum to ≤ 1")
    n = len(items)
    order = list(range(n))
    random.Random(seed).shuffle(order)

    def count(fraction: float) -> int:
        return max(1, round(n * fraction)) if fraction > 1e-9 else 0

    n_val, n_test = count(val), count(test)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise PipelineError(
            f"{origin}: {n} records are too few for a train/val/test split of {train}/{val}/{test:.2f}"
        )
    picked = [items[i] for i in order]
    return picked[:n_train], picked[n_train : n_train + n_val], picked[n_train + n_val :]


# ---------------------------------------------------------------------------------------------- tokenized datasets


@dataclass(frozen=True)
class Tokenized:
    """Token sequences of one split, with what fitting them into the context cost."""

    prompts: list[list[int]]
    responses: list[list[list[int]]]  # per item: [answer] for SFT, [chosen, rejected] for preferences
    ids: list[int]
    truncated: int  # sequences cut at the context length (their answer's end is lost)
    dropped: int  # items whose prompt alone fills the context (nothing left to learn from)

    def __len__(self) -> int:
        return len(self.prompts)


def tokenize_examples(
    enc: tiktoken.Encoding, examples: Sequence[Example], template: Template, context_length: int
) -> Tokenized:
    return _tokenize(enc, [(e, [e.output]) for e in examples], template, context_length)


def tokenize_pairs(
    enc: tiktoken.Encoding, pairs: Sequence[PreferencePair], template: Template, context_length: int
) -> Tokenized:
    return _tokenize(enc, [(p, [p.chosen, p.rejected]) for p in pairs], template, context_length)


def _tokenize(
    enc: tiktoken.Encoding,
    items: Sequence[tuple[Example | PreferencePair, list[str]]],
    template: Template,
    context_length: int,
) -> Tokenized:
    prompts, responses, ids, truncated, dropped = [], [], [], 0, 0
    for item, answers in items:
        prompt = encode_prompt(enc, item.instruction, item.input, template, item.context)
        if len(prompt) >= context_length:  # no room left for a single answer token
            dropped += 1
            continue
        encoded = [
            encode_response(enc, answer, template, item.instruction, item.input, item.context)
            for answer in answers
        ]
        # + 1: collate keeps context_length + 1 tokens (inputs and targets shifted by one)
        truncated += sum(len(prompt) + len(answer) > context_length + 1 for answer in encoded)
        prompts.append(prompt)
        responses.append(encoded)
        ids.append(item.id)
    return Tokenized(prompts, responses, ids, truncated, dropped)


RECIPE_FIELDS = {
    "data": str,
    "data_sha256": str,
    "template": str,
    "strict": bool,
    "split_train": float,
    "split_val": float,
    "split_seed": int,
}


def check_recipe(recipe: dict, where: str) -> None:
    """The SFT recipe a model directory records (data file, template, split) has every field, each of its type."""
    for key, kind in RECIPE_FIELDS.items():
        if type(recipe.get(key)) is not kind:  # exact type: a bool is no int, an int no float
            raise PipelineError(
                f"{where}.{key} is missing or not a {kind.__name__} (rerun it: dvc repro sft)"
            )
