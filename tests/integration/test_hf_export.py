"""Hugging Face export: transformers loads models/hf with our logits, our token ids (every tokenizer kind, every
instruction record through apply_chat_template), our greedy tokens through pipeline("text-generation"); init_from
models/hf gives the weights back bit for bit; a failed check writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from pipeline.common.config import ConfigError, ExportParams, parse_params
from pipeline.common.errors import PipelineError
from pipeline.data.instructions import load_examples, load_preferences
from pipeline.data.prompts import encode_prompt
from pipeline.data.tokenizer import (
    END_OF_TURN,
    SPECIAL_TOKENS,
    USER,
    load_tokenizer,
    read_metadata,
    save_tokenizer,
    train_tokenizer,
)
from pipeline.export.hf import EDGE_TEXTS, export_hf_model, hf_tokenizer, write_hf
from pipeline.model import gpt2_weights
from pipeline.model.checkpoint import load_model, save_model
from pipeline.model.generate import stream_tokens
from pipeline.model.gpt import GPT, PRESETS, GPTConfig
from pipeline.model.sampling import SamplingOptions
from tests.helpers.project import SHARED_DATA, generated_instructions
from tests.helpers.workspace import tokenize_corpus

PARAMS = ExportParams(parity_tokens=32)


def instruction_files(root: Path) -> list[Path]:
    """The book's SFT and preference files when ../shared is present, generated records otherwise, plus a chat file."""
    if SHARED_DATA.is_dir():
        files = [SHARED_DATA / "instruction-data.json", SHARED_DATA / "instruction-data-with-preference.json"]
    else:
        files = [root / "sft.json", root / "dpo.json"]
        files[0].write_text(json.dumps(generated_instructions(50)))
        files[1].write_text(json.dumps(generated_instructions(50, seed=1, preferences=True)))
    chat = [
        {
            "messages": [
                {"role": "system", "content": "Eres breve."},
                {"role": "user", "content": "¿Capital de Perú?"},
                {"role": "assistant", "content": "Lima."},
                {"role": "user", "content": "¿Y de Chile?\r\n"},
                {"role": "assistant", "content": "Santiago."},
            ]
        }
    ]
    (root / "chat.json").write_text(json.dumps(chat, ensure_ascii=False))
    return [*files, root / "chat.json"]


# A model that learned this passage continues it greedily with many distinct tokens and no EOT (a briefly trained
# model on general text only repeats its most frequent token, which would make the greedy comparison trivial).
PASSAGE = (
    "En un lugar de la Mancha, de cuyo nombre no quiero acordarme, no ha mucho tiempo que vivía un hidalgo "
    "de los de lanza en astillero. "
)


def memorized_model(enc) -> GPT:
    """cpu-tiny trained 300 steps on PASSAGE repeated (one thread: ≈10 s; more threads on a busy machine are slower)."""
    ids = torch.tensor(enc.encode_ordinary(PASSAGE * 12))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = GPT(replace(PRESETS["cpu-tiny"], vocab_size=enc.n_vocab))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(0)
        for _ in range(300):
            starts = torch.randint(0, len(ids) - 65, (4,), generator=generator)
            x = torch.stack([ids[s : s + 64] for s in starts])
            y = torch.stack([ids[s + 1 : s + 65] for s in starts])
            loss = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, corpus_text) -> Path:
    """data/tokenizer (bpe), data/shards, and models/dpo (a memorized passage; recorded as tuned with the chat template)."""
    root = tmp_path_factory.mktemp("hf-export")
    enc = train_tokenizer("bpe", [corpus_text], 512)
    fingerprint, cut = tokenize_corpus(root, corpus_text, enc, "bpe", 0.9)
    (root / "val.txt").write_bytes((root / "corpus.txt").read_bytes()[cut:])
    model = memorized_model(enc)
    save_model(
        root / "models/dpo",
        model.eval(),
        tokenizer={"path": "data/tokenizer", "fingerprint": fingerprint},
        instructions={"template": "chat"},
    )
    return root


@pytest.fixture(scope="module")
def exported(workspace) -> tuple[Path, dict]:
    out = workspace / "models/hf"
    return out, export_hf_model(
        workspace / "models/dpo", workspace / "data/tokenizer", workspace / "data/shards", out, PARAMS
    )


def test_directory_layout_config_and_metrics(exported):
    out, metrics = exported
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
    } <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["vocab_size"] == 512 and config["n_positions"] == 64 and config["tie_word_embeddings"]
    weights = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in weights and weights["transformer.wte.weight"].shape == (
        512,
        64,
    )  # tied: stored once
    generation = json.loads((out / "generation_config.json").read_text())
    enc = load_tokenizer(out.parent.parent / "data/tokenizer")
    assert generation["eos_token_id"] == [enc.eot_token, enc.encode_single_token(END_OF_TURN)]
    assert (
        metrics["passed"] and metrics["max_abs_logit_diff"] <= 1e-4 and metrics["tokenizer_agreement"] == 1.0
    )
    assert metrics["greedy_tokens_matched"] == 32
    assert 'pipeline("text-generation"' in (out / "README.md").read_text()


def test_automodel_logits_match_ours(exported, workspace):
    out, _ = exported
    ours = load_model(workspace / "models/dpo")[0]
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(ids)[0] - theirs(ids).logits).abs().max() <= 1e-4


def test_text_generation_pipeline_greedy_equals_our_generator(exported, workspace):
    out, _ = exported
    enc = load_tokenizer(workspace / "data/tokenizer")
    prompt = PASSAGE[:25]
    ids = enc.encode(prompt)
    ours = load_model(workspace / "models/dpo")[0]
    mine = [
        int(t)
        for t in stream_tokens(ours, torch.tensor([ids]), SamplingOptions(max_new_tokens=32, temperature=0))
    ]
    generator = pipeline("text-generation", model=str(out), device="cpu")
    result = generator(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, return_tensors=True)
    theirs = result[0]["generated_token_ids"][len(ids) :]
    assert enc.eot_token not in mine and len(set(mine)) >= 8, enc.decode(mine)
    assert [int(t) for t in theirs] == mine


def _records(files: list[Path]) -> list:
    records = []
    for path in files:
        loaded = (
            load_preferences(path)
            if "preference" in path.name or path.name == "dpo.json"
            else load_examples(path)
        )
        records += loaded.records
    return records


def _messages(record, template: str) -> list[dict]:
    context = [{"role": role, "content": content} for role, content in record.context]
    if template == "alpaca":
        return [{"role": "user", "content": record.instruction, "input": record.input}]
    user = f"{record.instruction}\n\n{record.input}" if record.input else record.instruction
    return [*context, {"role": "user", "content": user}]


def test_apply_chat_template_gives_our_prompt_ids_for_every_instruction_record(exported, workspace, tmp_path):
    out, _ = exported
    enc = load_tokenizer(workspace / "data/tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(out)
    records = _records(instruction_files(tmp_path))
    checked = 0
    for template in ("alpaca", "chat"):
        for record in records:
            if template == "alpaca" and record.context:
                continue
            theirs = tokenizer.apply_chat_template(
                _messages(record, template), chat_template=template, add_generation_prompt=True, tokenize=True
            )["input_ids"]
            assert theirs == encode_prompt(enc, record.instruction, record.input, template, record.context)
            checked += 1
    assert checked >= 2 * (len(records) - 1)
    default = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hola"}], add_generation_prompt=True, tokenize=False
    )
    assert default == f"{USER}Hola{END_OF_TURN}<|assistant|>"  # models/dpo was tuned with the chat template


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "char"])
def test_tokenizer_json_encodes_like_ours_for_every_kind(workspace, tmp_path, kind, corpus_text):
    enc = train_tokenizer(kind, [corpus_text], 600)
    save_tokenizer(enc, tmp_path / "tok", kind)
    hf_tokenizer(enc, read_metadata(tmp_path / "tok"), 64, "alpaca").save_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    val = (workspace / "val.txt").read_text(encoding="utf-8")
    texts = [val, *EDGE_TEXTS, "".join(SPECIAL_TOKENS), corpus_text[:5000]]
    texts += [
        f"{r.instruction}\n{r.input}\n{getattr(r, 'output', '')}"
        for r in _records(instruction_files(tmp_path))
    ]
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == enc.encode(text, allowed_special="all"), (
            text[:80]
        )
    assert tokenizer.decode(enc.encode(val)) == val


def test_round_trip_through_init_from_is_bit_for_bit(exported, workspace):
    out, _ = exported
    source = gpt2_weights.resolve(str(out))
    cfg = gpt2_weights.checkpoint_config(source, 512, read_metadata(workspace / "data/tokenizer"), None)
    back = gpt2_weights.load_weights(source, cfg)
    original = load_model(workspace / "models/dpo")[0]
    assert back.cfg == original.cfg  # qkv_bias false survives the GPT-2 layout's zero bias
    for name, tensor in original.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_untied_model_with_qkv_bias_round_trips_and_loads_in_transformers(workspace, tmp_path):
    torch.manual_seed(1)
    model = GPT(
        GPTConfig(
            vocab_size=512,
            context_length=32,
            n_embd=32,
            n_head=4,
            n_layer=2,
            qkv_bias=True,
            tie_weights=False,
        )
    ).eval()
    meta = read_metadata(workspace / "data/tokenizer")
    write_hf(model, load_tokenizer(workspace / "data/tokenizer"), meta, tmp_path / "hf", "alpaca")
    assert "lm_head.weight" in load_file(str(tmp_path / "hf/model.safetensors"))
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(5))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(ids)[0] - theirs(ids).logits).abs().max() <= 1e-4
    source = gpt2_weights.resolve(str(tmp_path / "hf"))
    back = gpt2_weights.load_weights(source, gpt2_weights.checkpoint_config(source, 512, meta, None))
    assert back.cfg == model.cfg and all(
        torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items()
    )


def test_init_from_an_export_refuses_another_tokenizer(exported):
    out, _ = exported
    source = gpt2_weights.resolve(str(out))
    with pytest.raises(
        PipelineError, match=r"exported with tokenizer [0-9a-f]{12}, but data/tokenizer is 000000000000"
    ):
        gpt2_weights.checkpoint_config(source, 512, {"kind": "bpe", "fingerprint": "0" * 64}, None)


def test_failed_parity_exports_nothing(workspace):
    with pytest.raises(
        PipelineError,
        match=r"Hugging Face export failed: max \|logit\(transformers\) - logit\(torch\)\| = "
        r".* > export.parity_atol=1e-12; nothing was exported",
    ) as err:
        export_hf_model(
            workspace / "models/dpo",
            workspace / "data/tokenizer",
            workspace / "data/shards",
            workspace / "models/never",
            replace(PARAMS, parity_atol=1e-12),
        )
    assert "\n" not in str(err.value) and not (workspace / "models/never").exists()


def _stage(workspace: Path, export: dict) -> subprocess.CompletedProcess:
    (workspace / "params.yaml").write_text(yaml.safe_dump({"seed": 1, "export": export}))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "stages.export"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_stage_writes_hf_metrics_and_marks_the_format_left_out(workspace):
    done = _stage(workspace, {"model": "dpo", "formats": ["hf"], "parity_tokens": 16})
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((workspace / "reports/export/metrics.json").read_text())
    assert metrics["hf"]["passed"] and metrics["hf"]["greedy_tokens_matched"] == 16
    for left_out in ("onnx", "gguf"):
        assert (
            workspace / f"models/{left_out}/README.md"
        ).read_text() == "Not exported: export.formats is ['hf'].\n"
    assert "transformers max |Δlogit|" in done.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (  # rotary positions make it the Llama family, which has no LayerNorm
            {"pos_emb": "rope"},
            "model.norm=layernorm: the Hugging Face Llama format cannot hold LayerNorm; the Llama family needs "
            "pos_emb: rope, norm: rmsnorm, mlp: swiglu (or drop hf from export.formats)",
        ),
        (
            {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "relu2"},
            "model.mlp=relu2: the Hugging Face Llama format cannot hold a non-gated MLP; the Llama family needs "
            "pos_emb: rope, norm: rmsnorm, mlp: swiglu (or drop hf from export.formats)",
        ),
        (
            {"n_kv_head": 2},
            "model.n_kv_head=2: the Hugging Face GPT-2 format cannot hold grouped-query attention (or drop hf "
            "from export.formats)",
        ),
        (
            {"norm": "rmsnorm"},
            "model.norm=rmsnorm: the Hugging Face GPT-2 format cannot hold RMSNorm; export a model "
            "trained with norm: layernorm (or drop hf from export.formats)",
        ),
        (
            {"mlp": "relu2"},
            "model.mlp=relu2: the Hugging Face GPT-2 format cannot hold a ReLU² MLP; export a model "
            "trained with mlp: gelu (or drop hf from export.formats)",
        ),
        (
            {"mlp": "swiglu"},
            "model.mlp=swiglu: the Hugging Face GPT-2 format cannot hold a SwiGLU MLP; export a model "
            "trained with mlp: gelu (or drop hf from export.formats)",
        ),
        (
            {"qk_norm": True},
            "model.qk_norm=true: the Hugging Face GPT-2 format cannot hold query/key normalisation; "
            "export a model trained with qk_norm: false (or drop hf from export.formats)",
        ),
    ],
)
def test_architecture_options_are_refused_naming_the_option(workspace, tmp_path, options, message):
    fingerprint = json.loads((workspace / "models/dpo/config.json").read_text())["tokenizer"]["fingerprint"]
    cfg = replace(load_model(workspace / "models/dpo")[0].cfg, **options)
    save_model(
        tmp_path / "modern", GPT(cfg), tokenizer={"path": "data/tokenizer", "fingerprint": fingerprint}
    )
    with pytest.raises(PipelineError) as exc:
        export_hf_model(
            tmp_path / "modern",
            workspace / "data/tokenizer",
            workspace / "data/shards",
            tmp_path / "hf",
            PARAMS,
        )
    assert str(exc.value) == message
    with pytest.raises(PipelineError, match="cannot hold"):
        write_hf(
            GPT(cfg),
            load_tokenizer(workspace / "data/tokenizer"),
            read_metadata(workspace / "data/tokenizer"),
            tmp_path / "direct",
            "alpaca",
        )
    assert not (tmp_path / "hf").exists() and not (tmp_path / "direct").exists()


def test_stage_refuses_an_unknown_format_with_one_line(tmp_path):
    done = _stage(tmp_path, {"formats": ["tflite"]})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: params.yaml: export.formats[0] must be one of 'onnx', 'gguf', 'hf', got 'tflite'"
    ]
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("formats", [[], ["hf", "hf"]])
def test_empty_or_repeated_formats_are_refused(formats):
    with pytest.raises(ConfigError, match=r"export.formats must be a non-empty list without repeats"):
        parse_params({"export": {"formats": formats}})


def test_two_projects_with_the_same_relative_tokenizer_path_export_their_own_ids(
    tmp_path, monkeypatch, corpus_text
):
    """tiktoken caches rank files by their path string: the export must never read ranks through that cache."""
    from tiktoken.load import load_tiktoken_bpe

    for name, size in (("a", 300), ("b", 400)):
        enc = train_tokenizer("bpe", [corpus_text[:30_000]], size)
        save_tokenizer(enc, tmp_path / name / "data/tokenizer", "bpe")
        monkeypatch.chdir(tmp_path / name)
        load_tiktoken_bpe(
            "data/tokenizer/tokenizer.tiktoken"
        )  # what a cached read of this path would return next
        hf_tokenizer(enc, read_metadata("data/tokenizer"), 64, "alpaca").save_pretrained("hf")
        tokenizer = AutoTokenizer.from_pretrained("hf")
        text = corpus_text[50_000:52_000]
        assert len(tokenizer) == size and tokenizer.encode(text) == enc.encode(text)
