"""Instruction and preference data: formats, templates, splits, collation and the errors bad records get."""

from __future__ import annotations

import json

import pytest

from pipeline.common.errors import PipelineError
from pipeline.data.instructions import (
    PreferencePair,
    load_examples,
    load_preferences,
    split_dataset,
    tokenize_examples,
    tokenize_pairs,
)
from pipeline.data.prompts import decode_response, encode_prompt, encode_response, format_prompt
from pipeline.data.tokenizer import ASSISTANT, END_OF_TURN, SYSTEM, USER, train_char
from pipeline.train.losses import IGNORE_INDEX
from pipeline.train.objectives import collate, collate_pairs
from tests.helpers.project import generated_instructions

# The book's ch07 `format_input` + "\n\n### Response:\n", spelled out independently of the code under test.
BOOK_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe cake was eaten.\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def enc():
    """A byte-level tokenizer: one token per ASCII character, so lengths in tests are easy to reason about."""
    return train_char([], 300)


def write(path, records, jsonl=False):
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    path.write_text(text, encoding="utf-8")
    return path


def test_alpaca_prompt_is_the_books(enc):
    assert format_prompt("Rewrite the sentence.", "The cake was eaten.") == BOOK_PROMPT
    without_input = format_prompt("Name a color.")
    assert "### Input:" not in without_input and without_input.endswith("Name a color.\n\n### Response:\n")
    assert enc.decode(encode_prompt(enc, "Rewrite the sentence.", "The cake was eaten.")) == BOOK_PROMPT


def test_chat_template_uses_reserved_special_tokens(enc):
    context = (("system", "Be brief."),)
    ids = encode_prompt(enc, "Say hi <|end|>", "", "chat", context)
    special = [enc.encode_single_token(t) for t in (SYSTEM, END_OF_TURN, USER, END_OF_TURN, ASSISTANT)]
    assert [i for i in ids if i >= enc.n_vocab - 16] == special  # literal "<|end|>" in user text stays text
    expected = f"{SYSTEM}Be brief.{END_OF_TURN}{USER}Say hi{END_OF_TURN}{ASSISTANT}"
    assert format_prompt("Say hi", "", "chat", context) == expected
    assert encode_response(enc, "Hi.", "chat")[-2:] == [enc.encode_single_token(END_OF_TURN), enc.eot_token]
    assert encode_response(enc, "Hi.", "alpaca")[-1] == enc.eot_token


def test_alpaca_template_refuses_chat_history():
    with pytest.raises(PipelineError, match="template: chat"):
        format_prompt("Hi", "", "alpaca", (("system", "Be brief."),))
    with pytest.raises(PipelineError, match="unknown instruction template"):
        format_prompt("Hi", "", "vicuna")


def test_json_and_jsonl_alpaca_and_chat_records_load_alike(tmp_path):
    records = [
        {"instruction": "Add 1 and 2.", "input": "", "output": "3"},
        {"instruction": "Translate.", "input": "hola", "output": "hello"},
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello!"},
            ]
        },
    ]
    from_json = load_examples(write(tmp_path / "a.json", records))
    from_jsonl = load_examples(write(tmp_path / "a.jsonl", records, jsonl=True))
    assert from_json.records == from_jsonl.records and not from_json.skipped
    chat = from_json.records[2]
    assert (chat.id, chat.instruction, chat.output, chat.context) == (
        2,
        "Hi?",
        "Hello!",
        (("system", "Be kind."),),
    )
    assert from_json.records[1].input == "hola"


def test_malformed_records_are_skipped_and_counted_or_fail_when_strict(tmp_path):
    records = [
        {"instruction": "Good.", "output": "Yes."},
        {"instruction": "No answer."},
        "not an object",
        {"instruction": "Bad input.", "input": 3, "output": "x"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "beep"}]},
    ]
    path = write(tmp_path / "bad.json", records)
    loaded = load_examples(path)
    assert [r.id for r in loaded.records] == [0]
    assert len(loaded.skipped) == 4
    assert "record 1: field 'output' is missing" in loaded.skipped[0]
    assert "record 2: field '<record>'" in loaded.skipped[1]
    assert "record 3: field 'input' must be a string" in loaded.skipped[2]
    assert "record 4: field 'messages[1].role'" in loaded.skipped[3]
    with pytest.raises(
        PipelineError, match=r"bad.json: record 1: field 'output' is missing \(strict: true\)"
    ) as err:
        load_examples(path, strict=True)
    assert "\n" not in str(err.value)


def test_broken_jsonl_line_is_reported_by_index(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output"\n')
    loaded = load_examples(path)
    assert len(loaded.records) == 1 and "record 1: field '<line>' is not valid JSON" in loaded.skipped[0]


@pytest.mark.parametrize("content", ["", "  \n", "[]"])
def test_empty_dataset_is_an_error(tmp_path, content):
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(PipelineError, match="empty.json: empty dataset"):
        load_examples(path)


def test_dataset_without_a_valid_record_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match=r"no valid records \(2 skipped"):
        load_examples(write(tmp_path / "none.json", [{"instruction": "x"}, {"output": "y"}]))
    with pytest.raises(PipelineError, match="dataset file not found"):
        load_examples(tmp_path / "missing.json")


def test_preference_formats(tmp_path):
    user = {"role": "user", "content": "Is it cold?"}
    records = [
        {"instruction": "Reply.", "input": "hi", "chosen": "Hello.", "rejected": "Go away."},
        {"prompt": "Reply politely.", "chosen": "Sure.", "rejected": "No."},
        {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": "A bit."}],
            "rejected": [{"role": "assistant", "content": "Whatever."}],
        },
        {
            "chosen": [user, {"role": "assistant", "content": "Yes, wear a coat."}],
            "rejected": [user, {"role": "assistant", "content": "Figure it out."}],
        },
    ]
    pairs = load_preferences(write(tmp_path / "p.json", records)).records
    assert [(p.instruction, p.input, p.chosen, p.rejected) for p in pairs] == [
        ("Reply.", "hi", "Hello.", "Go away."),
        ("Reply politely.", "", "Sure.", "No."),
        ("Is it cold?", "", "A bit.", "Whatever."),
        ("Is it cold?", "", "Yes, wear a coat.", "Figure it out."),
    ]


def test_bad_preference_records(tmp_path):
    user = {"role": "user", "content": "Q?"}
    records = [
        {"instruction": "Same.", "chosen": "Answer.", "rejected": "Answer. "},
        {"instruction": "Missing.", "chosen": "A."},
        {
            "chosen": [user, {"role": "assistant", "content": "A"}],
            "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "B"}],
        },
        {"instruction": "Fine.", "chosen": "Good.", "rejected": "Bad."},
    ]
    path = write(tmp_path / "p.json", records)
    loaded = load_preferences(path)
    assert [p.id for p in loaded.records] == [3]
    assert "record 0: field 'rejected' is identical to 'chosen'" in loaded.skipped[0]
    assert "record 1: field 'rejected' is missing" in loaded.skipped[1]
    assert "record 2: field 'rejected' must share every turn" in loaded.skipped[2]
    with pytest.raises(PipelineError, match="record 0: field 'rejected' is identical to 'chosen'"):
        load_preferences(path, strict=True)


def test_split_is_deterministic_disjoint_and_85_5_10():
    items = list(range(1100))
    train, val, test = split_dataset(items, 0.85, 0.05, seed=123, origin="sft")
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert sorted(train + val + test) == items
    assert (train, val, test) == split_dataset(items, 0.85, 0.05, seed=123, origin="sft")
    assert test != split_dataset(items, 0.85, 0.05, seed=124, origin="sft")[2]
    tiny = split_dataset(list(range(5)), 0.85, 0.05, seed=0, origin="sft")
    assert [len(part) for part in tiny] == [3, 1, 1]  # a positive fraction never gets an empty split
    assert len(split_dataset(items, 0.95, 0.05, seed=0, origin="dpo")[2]) == 0
    with pytest.raises(PipelineError, match="sft: 2 records are too few"):
        split_dataset([1, 2], 0.85, 0.05, seed=0, origin="sft")
    with pytest.raises(PipelineError, match="sum to ≤ 1"):
        split_dataset(items, 0.9, 0.2, seed=0, origin="sft")


def test_collate_pads_masks_and_appends_eot(enc):
    prompt = encode_prompt(enc, "Hi", "")
    long_answer, short_answer = encode_response(enc, "Hello there."), encode_response(enc, "Yo.")
    batch = collate(
        [(prompt, long_answer), (prompt, short_answer)], context_length=200, pad_id=0, mask_prompt=True
    )
    x, y = batch["input_ids"], batch["targets"]
    n = len(prompt) + len(long_answer) - 1
    assert x.shape == y.shape == (2, n)
    # Row 0: targets are the answer (ending with EOT) and nothing of the prompt.
    assert y[0, : len(prompt) - 1].eq(IGNORE_INDEX).all()
    assert y[0, len(prompt) - 1 :].tolist() == long_answer
    assert y[0, -1].item() == enc.eot_token
    # Row 1: padding is pad_id in the inputs and -100 in the targets.
    short_len = len(prompt) + len(short_answer) - 1
    assert x[1, short_len:].eq(0).all() and y[1, short_len:].eq(IGNORE_INDEX).all()
    assert y[1, len(prompt) - 1 : short_len].tolist() == short_answer
    unmasked = collate([(prompt, short_answer)], context_length=200, pad_id=0, mask_prompt=False)["targets"]
    assert unmasked[0].tolist() == (prompt + short_answer)[1:]


def test_truncation_to_context_is_counted_and_prompt_only_items_dropped(enc, tmp_path):
    records = [
        {"instruction": "Short.", "output": "Ok."},
        {"instruction": "Long answer.", "output": "word " * 40},
        {"instruction": "Huge prompt " + "x" * 300, "output": "Ok."},
    ]
    examples = load_examples(write(tmp_path / "t.json", records)).records
    context = len(encode_prompt(enc, "Long answer.", "")) + 20
    data = tokenize_examples(enc, examples, "alpaca", context)
    assert (len(data), data.truncated, data.dropped, data.ids) == (2, 1, 1, [0, 1])
    batch = collate(list(zip(data.prompts, (r[0] for r in data.responses), strict=False)), context, 0, True)
    assert batch["input_ids"].shape[1] == context  # cut to the context, not beyond
    assert batch["targets"][1, -1].item() != IGNORE_INDEX  # the cut answer still trains up to the edge


def test_collate_pairs_puts_chosen_first_and_masks_prompts(enc):
    pairs = [PreferencePair(i, f"Q{i}", "", "Good answer.", "Bad.") for i in range(3)]
    data = tokenize_pairs(enc, pairs, "alpaca", 200)
    batch = collate_pairs(data, [2, 0], 200, pad_id=0)
    assert batch["input_ids"].shape[0] == 4
    prompt_len = len(data.prompts[2])
    assert batch["targets"][:, : prompt_len - 1].eq(IGNORE_INDEX).all()
    chosen = batch["targets"][0][batch["targets"][0] != IGNORE_INDEX].tolist()
    rejected = batch["targets"][2][batch["targets"][2] != IGNORE_INDEX].tolist()
    assert chosen == data.responses[2][0] and rejected == data.responses[2][1]


def test_decode_response_stops_at_eot_or_end_of_turn(enc):
    text = enc.encode_ordinary(" The answer. ")
    assert decode_response(enc, text + [enc.eot_token] + enc.encode_ordinary("junk")) == "The answer."
    assert decode_response(enc, text + [enc.encode_single_token(END_OF_TURN), enc.eot_token]) == "The answer."
    assert decode_response(enc, text) == "The answer."


def test_shared_data_loads_with_its_six_identical_pairs_skipped(shared_data, tmp_path):
    if shared_data is None:
        records = generated_instructions(40, preferences=True)
        records[5]["rejected"] = records[5]["chosen"]
        path = write(tmp_path / "prefs.json", records)
        expected_skipped = 1
    else:
        path, expected_skipped = shared_data / "instruction-data-with-preference.json", 6
    loaded = load_preferences(path)
    assert len(loaded.skipped) == expected_skipped
    assert all("identical to 'chosen'" in line for line in loaded.skipped)
