"""The classify stage: labelled data in every format, the tone data, last-token pooling, trainable parts, reports."""

from __future__ import annotations

import io
import json
import random
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.common.config import LoRAParams
from pipeline.common.errors import PipelineError
from pipeline.data.labelled import LabelledText, balance, labelled, read_table, split, tone_records
from pipeline.data.tokenizer import save_tokenizer, train_bpe
from pipeline.evaluation.classify_metrics import scores
from pipeline.model import lora
from pipeline.model.checkpoint import ADAPTER, load_model, save_model
from pipeline.model.gpt import GPT, config_from_preset
from pipeline.train.classifier import build_classifier, class_logits, cli, collate_texts, encode_texts
from tests.helpers.project import SHARED_DATA, tiny_params

ROWS = [
    {"text": "free prize, call now", "label": "spam"},
    {"text": "see you at lunch", "label": "ham"},
    {"text": "win cash today", "label": "spam"},
]


def _tone_pairs(n: int) -> list[dict]:
    """The book's preference pairs when ../shared is present, else pairs made the same way (one side rewritten)."""
    if SHARED_DATA.is_dir():
        return json.loads((SHARED_DATA / "instruction-data-with-preference.json").read_text())[:n]
    rng, out = random.Random(0), []
    for i in range(n):
        answer = f"The answer to question {i} is {rng.randint(1, 99)}."
        polite, rude = (
            f"Thank you for asking! {answer} I hope this helps.",
            f"Ugh, obviously. {answer} Get it together.",
        )
        if i % 2:
            out.append(
                {
                    "instruction": f"Question {i}?",
                    "input": "",
                    "output": answer,
                    "chosen": polite,
                    "rejected": answer,
                }
            )
        else:
            out.append(
                {
                    "instruction": f"Question {i}?",
                    "input": "",
                    "output": answer,
                    "chosen": answer,
                    "rejected": rude,
                }
            )
    return out


# ---------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    "name, body",
    [
        ("d.csv", 'text,label\n"free prize, call now",spam\nsee you at lunch,ham\nwin cash today,spam\n'),
        ("d.json", json.dumps(ROWS)),
        ("d.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS)),
    ],
)
def test_tables_in_every_format_read_the_same(tmp_path, name, body):
    (tmp_path / name).write_text(body)
    assert labelled(read_table(tmp_path / name), "text", "label", name)[0] == [
        LabelledText(r["text"], r["label"]) for r in ROWS
    ]


def test_headerless_tsv_in_a_zip_reads_like_the_sms_spam_collection(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme", "not data")
        archive.writestr("SMSSpamCollection", 'ham\tsee you at "lunch\nspam\tfree prize, call now\n')
    (tmp_path / "sms.zip").write_bytes(buffer.getvalue())
    rows = read_table(tmp_path / "sms.zip", fmt="tsv", member="SMSSpamCollection", columns=("label", "text"))
    assert rows == [
        {"label": "ham", "text": 'see you at "lunch'},
        {"label": "spam", "text": "free prize, call now"},
    ]
    with pytest.raises(PipelineError, match="a zip of 2 files needs classify.member"):
        read_table(tmp_path / "sms.zip", fmt="tsv")


def test_missing_label_field_and_one_class_are_one_line_errors(tmp_path):
    with pytest.raises(PipelineError, match="^d.json: record 2 has no 'label' field"):
        labelled([ROWS[0], {"text": "x"}], "text", "label", "d.json")
    only_spam = [LabelledText(f"spam {i}", "spam") for i in range(20)]
    with pytest.raises(
        PipelineError, match=r"^d.json: 20 records of 1 class\(es\) \(spam\): a classifier needs at least two"
    ):
        split(only_spam, 0.7, 0.1, 0, "d.json")
    with pytest.raises(PipelineError, match="too few"):
        split([LabelledText("a", "x"), LabelledText("b", "y")], 0.7, 0.1, 0, "d.json")


def test_tone_data_labels_only_the_rewritten_side_and_drops_identical_pairs(tmp_path):
    pairs = _tone_pairs(40) + [
        {"instruction": "Same?", "input": "", "output": "Yes.", "chosen": "Yes.", "rejected": "Yes."}
    ]
    (tmp_path / "dpo.json").write_text(json.dumps(pairs))
    texts, dropped = tone_records(tmp_path / "dpo.json")
    assert dropped >= 1 and len(texts) == len(pairs) - dropped
    for pair, text in zip(
        [p for p in pairs if p["chosen"].strip() != p["rejected"].strip()], texts, strict=True
    ):
        rewritten, label = (
            (pair["chosen"], "polite")
            if pair["rejected"].strip() == pair["output"].strip()
            else (pair["rejected"], "impolite")
        )
        assert (text.text, text.label) == (rewritten.strip(), label)
        assert text.text != pair["output"].strip()  # the neutral original is never labelled


def test_balance_undersamples_and_held_out_prompts_only_reach_test():
    texts = [LabelledText(f"t{i}", "a" if i % 4 else "b", ((), f"q{i}", "")) for i in range(40)]
    balanced = balance(texts, seed=1)
    assert sum(t.label == "a" for t in balanced) == sum(t.label == "b" for t in balanced) == 10
    held = {((), f"q{i}", "") for i in range(5)}
    parts = split(texts, 0.7, 0.1, 3, "x", held)
    assert not held & {t.key for t in parts.train + parts.val}
    assert held <= {t.key for t in parts.test}


def test_scores_against_hand_counts():
    s = scores([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], ["a", "b"], majority=1)
    assert s["accuracy"] == pytest.approx(0.6) and s["majority_baseline"] == pytest.approx(0.6)
    assert s["per_class"]["b"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    assert s["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)


# ---------------------------------------------------------------------------------------------- model


def _base(vocab: int = 64) -> GPT:
    torch.manual_seed(0)
    return GPT(config_from_preset("cpu-tiny", vocab_size=vocab, context_length=32))


def test_class_logits_are_read_at_the_last_real_token_whatever_the_padding():
    model = build_classifier(_base(), 3, "all", LoRAParams(), seed=0).eval()
    alone = class_logits(model, torch.tensor([[5, 6, 7]]), torch.tensor([3]))
    batch = collate_texts([[5, 6, 7], [1, 2, 3, 4, 5, 6]], pad_id=63)
    torch.testing.assert_close(class_logits(model, batch["input_ids"], batch["lengths"])[0:1], alone)


def test_texts_end_in_endoftext_and_long_ones_are_cut_to_the_context_with_it():
    enc = train_bpe(["thank you, word by word, is text here"] * 20, 300)
    long = "word " * 40
    encoded = encode_texts(
        enc, ["Thank you!", long, "<|endoftext|> is text here"], [1, 0, 1], context_length=16
    )
    assert encoded.ids[0] == [*enc.encode_ordinary("Thank you!"), enc.eot_token]
    assert encoded.ids[1] == [
        *enc.encode_ordinary(long)[:15],
        enc.eot_token,
    ]  # the start kept, the marker last
    assert encoded.ids[2][:-1] == enc.encode_ordinary("<|endoftext|> is text here")  # a look-alike stays text
    assert encoded.truncated == 1 and encoded.labels == [1, 0, 1]


@pytest.mark.parametrize(
    "trainable, expected",
    [
        ("head", {"out_head.weight"}),
        ("last_block", {"out_head.weight", "final_norm.weight", "final_norm.bias", "blocks.1."}),
        ("lora", {"out_head.weight", "lora.A", "lora.B"}),
    ],
)
def test_trainable_parts(trainable, expected):
    params = LoRAParams(rank=4) if trainable == "lora" else LoRAParams()
    model = build_classifier(_base(), 2, trainable, params, seed=0)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(any(n.startswith(e) or n.endswith(e) for e in expected) for n in names)
    assert all(any(n.startswith(e) or n.endswith(e) for n in names) for e in expected)
    assert model.out_head.weight.shape == (2, model.cfg.n_embd) and not model.cfg.tie_weights


def test_lora_and_trainable_must_agree():
    with pytest.raises(PipelineError, match="classify.trainable 'lora' needs classify.lora.rank > 0"):
        build_classifier(_base(), 2, "lora", LoRAParams(), seed=0)
    with pytest.raises(PipelineError, match="classify.lora.rank 4 is set but classify.trainable is 'head'"):
        build_classifier(_base(), 2, "head", LoRAParams(rank=4), seed=0)


# ---------------------------------------------------------------------------------------------- the stage


def _project(dest: Path, classify: dict | None = None, pairs: int = 80) -> Path:
    """What the classify stage reads, made directly: tokenizer, base model, raw SFT/DPO data, params."""
    raw = dest / "data" / "raw"
    raw.mkdir(parents=True)
    tone = _tone_pairs(pairs)
    (raw / "dpo.json").write_text(json.dumps(tone))
    (raw / "sft.json").write_text(
        json.dumps([{k: r[k] for k in ("instruction", "input", "output")} for r in tone])
    )
    texts = [r["chosen"] + "\n" + r["rejected"] for r in tone]
    fingerprint = save_tokenizer(train_bpe(texts, 400), dest / "data" / "tokenizer", "bpe")
    torch.manual_seed(0)
    base = GPT(config_from_preset("cpu-tiny", vocab_size=400, context_length=24))
    save_model(
        dest / "models" / "base", base, tokenizer={"path": "data/tokenizer", "fingerprint": fingerprint}
    )
    params = tiny_params()
    params["classify"] = {
        "batch_size": 8,
        "max_steps": 6,
        "warmup_steps": 1,
        "eval_every": 3,
        "eval_batches": 2,
        "checkpoint_every": 3,
        "log_every": 1,
        "dtype": "fp32",
        "lr": 0.003,
        **(classify or {}),
    }
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def _run(cwd: Path, monkeypatch) -> None:
    from stages import classify

    monkeypatch.chdir(cwd)
    classify.main()


@pytest.mark.integration  # the classify stage, trained
def test_stage_writes_classifier_scores_plots_and_the_cli_labels_text(tmp_path, monkeypatch, capsys):
    project = _project(tmp_path)
    _run(project, monkeypatch)
    assert "classify: test accuracy" in capsys.readouterr().err
    metrics = json.loads((project / "reports/classify/metrics.json").read_text())
    assert metrics["labels"] == ["impolite", "polite"]
    for name in ("train", "val", "test"):
        assert set(metrics[name]) >= {
            "accuracy",
            "macro_f1",
            "majority_baseline",
            "per_class",
            "confusion",
            "n",
        }
        assert (
            metrics[name]["n"] == metrics["data"][name]
            and sum(map(sum, metrics[name]["confusion"])) == metrics[name]["n"]
        )
    assert metrics["data"]["held_out_in_test"] > 0  # the SFT test prompts are classified, never trained on
    assert metrics["data"]["truncated"] > 0  # context 24: the long rewrites are cut, and counted
    assert metrics["summary"]["trainable_share"] < 0.5  # last block + final norm + head
    assert (project / "reports/classify/confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert (project / "reports/classify/plots/metrics/val/accuracy.tsv").is_file()
    model, meta = load_model(project / "models/classifier")
    assert model.cfg.n_classes == 2 and meta["labels"] == ["impolite", "polite"]
    from pipeline.serve.served_model import load_model_dir

    with pytest.raises(PipelineError, match="models/classifier: a classifier, not a language model"):
        load_model_dir("c", project / "models/classifier")

    from pipeline.cli import main as pipeline_main

    assert (
        pipeline_main(
            ["classify", "--model", "models/classifier", "You are wonderful, thank you!", "whatever"]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t")[0] in ("impolite", "polite") and lines[0].endswith(
        "You are wonderful, thank you!"
    )
    probabilities = [float(line.split()[1]) for line in lines[1:3]]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3) and probabilities[0] >= probabilities[1]


@pytest.mark.integration  # the classify stage, trained
def test_stage_with_unmerged_lora_writes_an_adapter_that_loads(tmp_path, monkeypatch):
    project = _project(tmp_path, {"trainable": "lora", "lora": {"rank": 2, "merge": False}})
    _run(project, monkeypatch)
    assert (project / "models/classifier" / ADAPTER).is_file()
    model, meta = load_model(project / "models/classifier")
    assert meta["adapter"]["train_fully"] == ["out_head"] and lora.adapter_info(model) is None
    metrics = json.loads((project / "reports/classify/metrics.json").read_text())
    assert 0 < metrics["summary"]["trainable_share"] < 0.1


def test_stage_refuses_a_csv_without_the_label_field(tmp_path, monkeypatch, capsys):
    project = _project(tmp_path, {"data": "inputs/d.csv", "label_field": "category"})
    (project / "inputs").mkdir()
    (project / "inputs/d.csv").write_text("text,label\nhello,a\nbye,b\n")
    from stages import classify

    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as info:
        classify.main()
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: inputs/d.csv: record 1 has no 'category' field (fields: text, label)"
    assert not (project / "models/classifier").exists()


REFUSED = {  # labelled data that str() used to turn into something else: the file, the record, the field
    "empty label": (
        "d.csv",
        "text,label\nhello,a\nbye,\nhi,b\n",
        "error: inputs/d.csv: record 2: field 'label' is empty (every record needs a label)",
    ),
    "integer text": (
        "d.json",
        json.dumps([*ROWS, {"text": 0, "label": "ham"}]),
        "error: inputs/d.json: record 4: field 'text' is a int (0), not a string",
    ),
    "list label": (
        "d.jsonl",
        "".join(json.dumps(r) + "\n" for r in [*ROWS, {"text": "hola", "label": ["pos"]}]),
        "error: inputs/d.jsonl: record 4: field 'label' is a list ([\"pos\"]); a label is a string or an integer",
    ),
    "boolean label": (
        "d.json",
        json.dumps([{"text": "hola", "label": True}, *ROWS]),
        "error: inputs/d.json: record 1: field 'label' is a bool (true); a label is a string or an integer",
    ),
    "csv quote never closed": (
        "d.csv",
        'text,label\nhello,a\n"bye,b\n' + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(200)),
        "error: inputs/d.csv: line 3: a quoted field is never closed (unexpected end of data)",
    ),
    "csv row wider than the header": (
        "d.csv",
        "text,label\nhello,a\nbye, then,b\n",
        "error: inputs/d.csv: line 3: 3 fields, the header has 2 (quote a field that holds ',')",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_stage_refuses_labelled_data_it_would_have_coerced(tmp_path, monkeypatch, capsys, case):
    name, body, message = REFUSED[case]
    project = _project(tmp_path, {"data": f"inputs/{name}"})
    (project / "inputs").mkdir()
    (project / "inputs" / name).write_text(body)
    from stages import classify

    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as info:
        classify.main()
    assert info.value.code == 1
    assert capsys.readouterr().err.strip() == message
    assert not (project / "models/classifier").exists()


def test_integer_labels_are_labels(tmp_path):
    rows = [{"text": r["text"], "label": int(r["label"] == "spam")} for r in ROWS]
    assert [t.label for t in labelled(rows, "text", "label", "d.json")[0]] == ["1", "0", "1"]


def test_cli_refuses_a_language_model(tmp_path, monkeypatch):
    project = _project(tmp_path)
    monkeypatch.chdir(project)
    with pytest.raises(PipelineError, match="models/base: not a classifier"):
        cli(["--model", "models/base", "hi"])


def test_merged_lora_classifier_equals_its_adapter_form():
    model = build_classifier(_base(), 2, "lora", LoRAParams(rank=2), seed=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(0, 0.1)
    batch = collate_texts([[1, 2, 3], [4, 5]], pad_id=0)
    expected = class_logits(model, batch["input_ids"], batch["lengths"])
    torch.testing.assert_close(
        class_logits(lora.merge(model), batch["input_ids"], batch["lengths"]), expected, atol=1e-5, rtol=1e-5
    )


@pytest.mark.integration  # onnxruntime round trip
def test_classifier_exports_to_onnx_with_a_parity_gate(tmp_path):
    import onnxruntime as ort

    from pipeline.common.config import ExportParams
    from pipeline.export.onnx_classifier import FILE, export_classifier

    fingerprint = save_tokenizer(train_bpe(["hello there, how are you"] * 20, 300), tmp_path / "tok", "bpe")
    model = build_classifier(_base(vocab=300), 3, "all", LoRAParams(), seed=0).eval()
    meta = {"labels": ["a", "b", "c"], "tokenizer": {"path": "tok", "fingerprint": fingerprint}}
    texts = [[1, 2, 3], list(range(5, 30)), [7, 8]]
    params = ExportParams(model="classifier", opset=18)
    metrics = export_classifier(model, meta, tmp_path / "tok", tmp_path / "onnx", texts, params, seed=0)
    assert metrics["parity"]["passed"] and metrics["parity"]["same_class"] == metrics["parity"]["texts"] == 8
    session = ort.InferenceSession(str(tmp_path / "onnx" / FILE))
    batch = collate_texts(texts, pad_id=0)
    (logits,) = session.run(
        None, {"input_ids": batch["input_ids"].numpy(), "lengths": batch["lengths"].numpy()}
    )
    with torch.no_grad():
        expected = class_logits(model, batch["input_ids"], batch["lengths"]).numpy()
    assert logits.shape == (3, 3) and abs(logits - expected).max() < 1e-4
    assert json.loads((tmp_path / "onnx/config.json").read_text())["labels"] == ["a", "b", "c"]

    with pytest.raises(PipelineError, match="export parity failed: .* nothing was exported"):
        export_classifier(
            model,
            meta,
            tmp_path / "tok",
            tmp_path / "onnx2",
            texts,
            ExportParams(model="classifier", opset=18, parity_atol=1e-12),
            seed=0,
        )
    assert not (tmp_path / "onnx2").exists()


def test_batches_are_padded_to_their_longest_text_not_the_context():
    from pipeline.train.classifier import ClassifyObjective, Encoded

    texts = Encoded([[1] * n for n in (3, 9, 4, 7, 5, 6, 2, 8)], [0, 1] * 4, 0)
    objective = ClassifyObjective(texts, texts, batch_size=4, grad_accum=1, eval_batches=2, pad_id=0, seed=1)
    for step in range(2):
        batch = objective.train_batch(step, 0, 0, 1)
        assert batch["input_ids"].shape[1] == int(batch["lengths"].max())  # no column beyond the longest text
    assert [b["input_ids"].shape[1] for b in objective.eval_batches()] == [9, 8]
