"""GGUF export: the files load in llama.cpp (llama-cpp-python) and agree with our model and tokenizer; the Ollama
Modelfile's TEMPLATE, rendered by Go's text/template, is our prompt. Neither check is ever skipped: without `go`
or `llama_cpp` these tests fail and say what to install. llama.cpp runs only in the checks' child process, never
in pytest's: a crash there (forced here with a stand-in `llama_cpp` that kills itself) is one line, not a dead run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gguf
import pytest
import torch
import yaml

from pipeline.common.config import ExportParams, parse_params
from pipeline.common.errors import PipelineError
from pipeline.common.isolated import run_isolated
from pipeline.data.instructions import read_records
from pipeline.data.prompts import chat_prompt_ids
from pipeline.data.tokenizer import gpt2, save_tokenizer, train_bpe, train_char
from pipeline.export.gguf import (
    MODELFILE,
    GGUFTokenizer,
    byte_to_unicode,
    export_gguf,
    go_template,
    merges,
    modelfile,
    write_gguf,
)
from pipeline.export.gguf_check import CRASH_ADVICE, RUNTIME, check_in_child, runtime_name
from pipeline.model.checkpoint import save_model
from pipeline.model.gpt import GPT, PRESETS
from tests.helpers.workspace import tokenize_corpus, train_briefly

ROOT = Path(__file__).resolve().parents[2]
INSTRUCTIONS = ROOT.parent / "shared/data/instruction-data.json"
CONVERSATIONS = [
    [("user", "Name a colour.")],
    [("user", "Rewrite:\n\nThe cat sat.")],
    [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "¿Qué hora es?")],
]
GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	var data struct{ Messages []Message }
	if err := json.NewDecoder(os.Stdin).Decode(&data); err != nil {
		panic(err)
	}
	if err := template.Must(template.New("TEMPLATE").Parse(string(text))).Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
"""


def require_llama_cpp() -> str:
    """The runtime's name; found, not imported (only the child process loads it)."""
    name = runtime_name()
    if name is None:  # a loud failure, never a skip: the proof is the point of these tests
        pytest.fail("llama_cpp is not installed: `pip install llama-cpp-python` (scripts/setup.sh does)")
    return name


@pytest.fixture(scope="module")
def go_render(tmp_path_factory) -> Path:
    """Go's text/template as a program: TEMPLATE file as argument, {"Messages": [...]} on stdin."""
    if shutil.which("go") is None:
        pytest.fail(
            "`go` is missing: apt-get install golang-go (scripts/setup.sh installs it); the Modelfile "
            "TEMPLATE cannot be verified without Go's text/template"
        )
    root = tmp_path_factory.mktemp("go")
    (root / "main.go").write_text(GO_RENDER)
    env = {
        "GOCACHE": str(root / "cache"),
        "GOPATH": str(root / "gopath"),
        "HOME": str(root),
        "PATH": "/usr/bin:/bin",
        "GO111MODULE": "off",
    }
    go = shutil.which("go")
    subprocess.run(
        [go, "build", "-o", str(root / "render"), str(root / "main.go")],
        check=True,
        env=env,
        cwd=root,
        capture_output=True,
        timeout=300,
    )
    return root / "render"


def render_go(program: Path, template: str, messages: list[tuple[str, str]], tmp_path: Path) -> str:
    (tmp_path / "TEMPLATE").write_text(template, encoding="utf-8")
    data = json.dumps({"Messages": [{"role": r, "content": c} for r, c in messages]})
    done = subprocess.run(
        [str(program), str(tmp_path / "TEMPLATE")],
        input=data,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, corpus_text) -> Path:
    """A bpe tokenizer, shards whose validation split holds ≥ 2,048 positions, and a briefly trained tiny chat model."""
    root = tmp_path_factory.mktemp("gguf")
    enc = train_bpe([corpus_text], 512)
    fingerprint, _ = tokenize_corpus(root, corpus_text, enc, "bpe", 0.6)
    torch.manual_seed(0)
    model = train_briefly(
        GPT(replace(PRESETS["cpu-tiny"], vocab_size=enc.n_vocab, qkv_bias=False)), root / "data/shards", 60
    )
    save_model(
        root / "models/dpo",
        model,
        tokenizer={"path": "data/tokenizer", "fingerprint": fingerprint},
        instructions={"template": "chat"},
    )
    return root


# ---------------------------------------------------------------------------------------------- pure parts


def test_byte_level_alphabet_and_merges_rebuild_the_vocabulary():
    alphabet = byte_to_unicode()
    assert len(set(alphabet.values())) == 256 and alphabet[ord("A")] == "A" and alphabet[ord(" ")] == "Ġ"
    enc = train_bpe(["hello world, hello there; 12345 ñandú " * 50], 300)
    ranks = enc.__getstate__()["mergeable_ranks"]
    pairs = list(merges(ranks))
    assert len(pairs) == len(ranks) - 256 and all(a + b in ranks for a, b in pairs)


def test_char_tokenizer_is_refused_with_a_clear_error():
    enc = train_char(["abc"], 272)
    with pytest.raises(
        PipelineError, match=r"tokenizer.kind=char: llama.cpp has no pre-tokenizer .* one character"
    ):
        GGUFTokenizer.of(enc, "char", enc.n_vocab)


def test_export_params_formats_and_types_are_validated():
    params = parse_params({"export": {"formats": ["gguf"], "gguf_types": ["q8_0"]}})
    assert params.export.formats == ("gguf",) and params.export.gguf_types == ("q8_0",)
    for bad, match in (
        ({"formats": ["tflite"]}, "export.formats"),
        ({"gguf_types": ["q4_0"]}, "export.gguf_types"),
        ({"formats": []}, "export.formats"),
        ({"gguf_types": ["f16", "f16"]}, "export.gguf_types"),
    ):
        with pytest.raises(PipelineError, match=match):
            parse_params({"export": bad})


@pytest.mark.parametrize("template", ["alpaca", "chat", None])
def test_modelfile_template_rendered_by_go_is_our_prompt(go_render, tmp_path, template):
    enc = train_char([], 272)
    conversations = CONVERSATIONS if template != "alpaca" else CONVERSATIONS + [[("user", "Only one")]]
    for turns in conversations:
        rendered = render_go(go_render, go_template(template), turns, tmp_path)
        assert enc.encode(rendered, allowed_special="all") == chat_prompt_ids(enc, template, turns), rendered
    text = modelfile("dpo-f16.gguf", template, 64)
    assert (
        text.startswith("# q8_0 on Intel CPUs with AMX")
        and "--no-repack" in text
        and "llama.cpp#20824" in text
    )
    assert "\nFROM ./dpo-f16.gguf\n" in text and f'TEMPLATE """{go_template(template)}"""' in text
    assert 'PARAMETER stop "<|endoftext|>"' in text and "PARAMETER num_ctx 64" in text
    assert ('PARAMETER stop "<|end|>"' in text) == (template == "chat")


# ---------------------------------------------------------------------------------------------- llama.cpp


def test_export_writes_gguf_files_and_modelfile_verified_in_llama_cpp(workspace, go_render, tmp_path, capsys):
    require_llama_cpp()
    params = ExportParams(gguf_types=("f32", "f16", "q8_0"), parity_tokens=32)
    out = workspace / "models/gguf"
    metrics = export_gguf(
        workspace / "models/dpo", workspace / "data/tokenizer", workspace / "data/shards", out, params
    )
    assert sorted(p.name for p in out.iterdir()) == [
        MODELFILE,
        "dpo-f16.gguf",
        "dpo-f32.gguf",
        "dpo-q8_0.gguf",
    ]
    assert (
        metrics["verified_by"].startswith("llama.cpp via llama-cpp-python")
        and metrics["pre_tokenizer"] == "llama-bpe"
    )
    for kind, minimum in (("f32", 0.99), ("f16", 0.98), ("q8_0", 0.95)):
        figures = metrics[kind]
        assert figures["teacher_forced_positions"] >= 2000 and figures["top1_agreement"] >= minimum
        assert figures["tokenizer_identical"] and figures["chat_template_matches"] is True
    assert metrics["size_mb"]["q8_0"] < metrics["size_mb"]["f16"] < metrics["size_mb"]["f32"]
    with capsys.disabled():  # the agreement figures, in CI's output
        print(
            "\nllama.cpp agreement:",
            json.dumps(
                {
                    k: {
                        m: metrics[k][m]
                        for m in (
                            "top1_agreement",
                            "teacher_forced_positions",
                            "max_abs_logit_diff",
                            "greedy",
                        )
                    }
                    for k in ("f32", "f16", "q8_0")
                },
                indent=1,
            ),
        )

    reader = gguf.GGUFReader(out / "dpo-f16.gguf")
    field = reader.fields["tokenizer.ggml.add_bos_token"]
    assert bool(field.parts[field.data[0]][0]) is False
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied head: llama.cpp reuses token_embd
    # The Modelfile's TEMPLATE is our chat prompt, rendered by Go.
    modelfile_text = (out / MODELFILE).read_text()
    assert "\nFROM ./dpo-f32.gguf\n" in modelfile_text
    template = modelfile_text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    from pipeline.data.tokenizer import load_tokenizer

    enc = load_tokenizer(workspace / "data/tokenizer")
    for turns in CONVERSATIONS:
        assert enc.encode(
            render_go(go_render, template, turns, tmp_path), allowed_special="all"
        ) == chat_prompt_ids(enc, "chat", turns)


def test_llama_cpp_tokenizes_real_instructions_and_gpt2_text_as_we_do(tmp_path):
    """The gpt2 kind (GPT-2's own 50k vocabulary through llama.cpp's "gpt-2" pre-tokenizer) and the instruction
    prompts of the shared data (or generated ones) in the Alpaca format."""
    require_llama_cpp()
    enc = gpt2()
    torch.manual_seed(0)
    model = GPT(replace(PRESETS["cpu-tiny"], vocab_size=enc.n_vocab, n_embd=32, n_head=2, n_layer=1))
    path = tmp_path / "gpt2.gguf"
    tokenizer = GGUFTokenizer.of(enc, "gpt2", enc.n_vocab)
    assert tokenizer.pre == "gpt-2"
    write_gguf(model, tokenizer, "alpaca", path, "f32", "gpt2-tokenizer")
    save_tokenizer(enc, tmp_path / "tokenizer", "gpt2")
    if INSTRUCTIONS.is_file():
        records = read_records(INSTRUCTIONS)[:200]
    else:
        from tests.helpers.project import generated_instructions

        records = generated_instructions(50)
    prompts = [
        enc.decode(chat_prompt_ids(enc, "alpaca", [("user", r["instruction"] + r.get("input", ""))]))
        for r in records
    ]
    # The Alpaca chat template (earlier turns as the Input transcript), rendered by llama-cpp-python's Jinja.
    found = check_in_child(
        "check_tokenizer",
        path,
        300,
        tokenizer_dir=str(tmp_path / "tokenizer"),
        context_length=model.cfg.context_length,
        texts=prompts,
        chats=CONVERSATIONS,
        chat_ids=[chat_prompt_ids(enc, "alpaca", c) for c in CONVERSATIONS],
    )
    assert found["mismatch"] is None and found["tokenizer_tokens_compared"] > 5000
    assert found["chat_template_matches"] is True


def stage_export(root: Path, export: dict, first_on_path: Path | None = None) -> subprocess.CompletedProcess:
    (root / "params.yaml").write_text(yaml.safe_dump({"seed": 1, "export": export}))  # 1e-30 stays a float
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (first_on_path, ROOT) if p)}
    return subprocess.run(
        [sys.executable, "-m", "stages.export"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_stage_writes_gguf_and_modelfile_and_says_which_runtime_verified_them(workspace):
    require_llama_cpp()
    done = stage_export(workspace, {"formats": ["gguf"], "gguf_types": ["q8_0"]})
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (workspace / "models/gguf").iterdir()) == [MODELFILE, "dpo-q8_0.gguf"]
    assert (workspace / "models/onnx/README.md").read_text() == "Not exported: export.formats is ['gguf'].\n"
    metrics = json.loads((workspace / "reports/export/metrics.json").read_text())
    assert metrics["formats"] == ["gguf"] and metrics["gguf"]["verified_by"].startswith("llama.cpp via")
    assert metrics["gguf"]["q8_0"]["top1_agreement"] >= 0.95
    assert "verified by llama.cpp via llama-cpp-python" in done.stderr.splitlines()[-1]


def repack_setting() -> dict:
    """In a child: llama.cpp's model defaults inside and after ``no_weight_repacking``."""
    from llama_cpp import llama_cpp as lib

    from pipeline.export.gguf_check import no_weight_repacking

    with no_weight_repacking():
        inside = lib.llama_model_default_params().use_extra_bufts
    return {"inside": inside, "after": lib.llama_model_default_params().use_extra_bufts}


def test_the_checks_load_files_without_llama_cpps_weight_repacking():
    """The AMX repack of q8_0 is the path that segfaults (docs/export.md); llama.cpp's own default is to repack."""
    require_llama_cpp()
    found = run_isolated(
        f"{__name__}:repack_setting", {}, subject="llama.cpp", runtime=RUNTIME, advice="", timeout=120
    )
    assert found == {"inside": False, "after": True}


# Imported in the check's child process in place of llama-cpp-python: it dies as llama.cpp's AMX path did.
CRASHING_LLAMA_CPP = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"


def test_a_llama_cpp_crash_is_one_line_and_every_output_is_whole(workspace, tmp_path):
    """The decision documented in docs/export.md: the files are published marked unverified, the stage goes on."""
    require_llama_cpp()
    (tmp_path / "stand-in/llama_cpp").mkdir(parents=True)
    (tmp_path / "stand-in/llama_cpp/__init__.py").write_text(CRASHING_LLAMA_CPP)
    done = stage_export(
        workspace,
        {
            "formats": ["gguf", "onnx"],
            "gguf_types": ["f16", "q8_0"],
            "quantize_int8": False,
            "parity_tokens": 16,
        },
        first_on_path=tmp_path / "stand-in",
    )
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: models/gguf/dpo-{t}.gguf: llama.cpp (llama-cpp-python) crashed (SIGSEGV) in its "
        f"child process; {CRASH_ADVICE}"
        for t in ("f16", "q8_0")
    ]
    assert sorted(p.name for p in (workspace / "models/gguf").iterdir()) == [
        MODELFILE,
        "dpo-f16.gguf",
        "dpo-q8_0.gguf",
    ]
    reader = gguf.GGUFReader(workspace / "models/gguf/dpo-q8_0.gguf")  # whole: every tensor is there
    assert {t.name for t in reader.tensors} >= {
        "token_embd.weight",
        "blk.0.attn_qkv.weight",
        "output_norm.bias",
    }
    assert {"model.onnx", "config.json", "README.md", "tokenizer"} <= {
        p.name for p in (workspace / "models/onnx").iterdir()
    }
    metrics = json.loads((workspace / "reports/export/metrics.json").read_text())
    assert metrics["parity"]["max_abs_logit_diff"] <= 1e-4  # the ONNX export ran after the crashes, whole
    for t in ("f16", "q8_0"):
        assert metrics["gguf"][t] == {
            "passed": False,
            "crashed": "SIGSEGV",
            "reason": warnings[0 if t == "f16" else 1][9:],
        }
    assert metrics["gguf"]["unverified"].startswith(
        "f16: llama.cpp crashed (SIGSEGV); q8_0: llama.cpp crashed (SIGSEGV)"
    )
    assert done.stderr.splitlines()[-1].endswith("f16 UNVERIFIED, q8_0 UNVERIFIED")


def test_a_format_that_fails_late_publishes_no_format(workspace):
    """The GGUF files are built and checked first; the ONNX parity check then fails: models/gguf stays as it was."""
    require_llama_cpp()
    models = workspace / "models"
    before = {p.relative_to(models): p.read_bytes() for p in models.rglob("*") if p.is_file()}
    done = stage_export(
        workspace,
        {"formats": ["gguf", "onnx"], "gguf_types": ["f16"], "parity_atol": 1e-30, "parity_tokens": 16},
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: export parity failed"), done.stderr
    assert "export: models/dpo → dpo-f16.gguf" in done.stderr  # it was built, then withdrawn with the rest
    after = {p.relative_to(models): p.read_bytes() for p in models.rglob("*") if p.is_file()}
    assert after == before  # nothing published, nothing left behind (no hidden temp directories either)


def test_stage_refuses_a_char_tokenizer_with_one_line_and_no_output(tmp_path):
    enc = train_char(["abc"], 272)
    fingerprint = save_tokenizer(enc, tmp_path / "data/tokenizer", "char")
    model = GPT(replace(PRESETS["cpu-tiny"], vocab_size=enc.n_vocab))
    save_model(
        tmp_path / "models/dpo", model, tokenizer={"path": "data/tokenizer", "fingerprint": fingerprint}
    )
    done = stage_export(tmp_path, {"formats": ["gguf"]})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: tokenizer.kind=char: llama.cpp has no pre-tokenizer that reproduces one character per piece; GGUF "
        "export needs tokenizer.kind bpe or gpt2 (or drop gguf from export.formats)"
    ]
    assert not (tmp_path / "models/gguf").exists() and not (tmp_path / "reports").exists()


ARCHITECTURE_REFUSALS = [
    (  # rotary positions make it the Llama family, which has no LayerNorm
        {"pos_emb": "rope"},
        "model.norm=layernorm: GGUF's Llama family (llama.cpp's llama and qwen3 architectures) cannot hold "
        "LayerNorm; the Llama family needs pos_emb: rope, norm: rmsnorm, mlp: swiglu (or drop gguf from "
        "export.formats)",
    ),
    (
        {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True},
        "model.bias=true: GGUF's Llama family (llama.cpp's llama and qwen3 architectures) cannot hold Qwen3's "
        "(qk_norm) out_proj or MLP biases; train with bias: false (or drop gguf from export.formats)",
    ),
    (
        {"norm": "rmsnorm"},
        "model.norm=rmsnorm: the GGUF GPT-2 format (llama.cpp's gpt2 architecture) cannot hold "
        "RMSNorm; export a model trained with norm: layernorm (or drop gguf from export.formats)",
    ),
    (
        {"mlp": "relu2"},
        "model.mlp=relu2: the GGUF GPT-2 format (llama.cpp's gpt2 architecture) cannot hold a ReLU² "
        "MLP; export a model trained with mlp: gelu (or drop gguf from export.formats)",
    ),
    (
        {"mlp": "swiglu"},
        "model.mlp=swiglu: the GGUF GPT-2 format (llama.cpp's gpt2 architecture) cannot hold a "
        "SwiGLU MLP; export a model trained with mlp: gelu (or drop gguf from export.formats)",
    ),
    (
        {"qk_norm": True},
        "model.qk_norm=true: the GGUF GPT-2 format (llama.cpp's gpt2 architecture) cannot hold "
        "query/key normalisation; export a model trained with qk_norm: false (or drop gguf from "
        "export.formats)",
    ),
]


@pytest.mark.parametrize(("options", "message"), ARCHITECTURE_REFUSALS)
def test_architecture_options_are_refused_naming_the_option(tmp_path, options, message):
    enc = train_bpe(["abc abd abe"], 300)
    fingerprint = save_tokenizer(enc, tmp_path / "data/tokenizer", "bpe")
    model = GPT(replace(PRESETS["cpu-tiny"], vocab_size=enc.n_vocab, **options))
    save_model(
        tmp_path / "models/dpo",
        model,
        tokenizer={"path": str(tmp_path / "data/tokenizer"), "fingerprint": fingerprint},
    )
    with pytest.raises(PipelineError) as exc:
        export_gguf(
            tmp_path / "models/dpo",
            tmp_path / "data/tokenizer",
            tmp_path / "data/shards",
            tmp_path / "models/gguf",
            ExportParams(),
        )
    assert str(exc.value) == message
    with pytest.raises(PipelineError, match="cannot hold"):
        write_gguf(model, GGUFTokenizer.of(enc, "bpe", enc.n_vocab), None, tmp_path / "m.gguf", "f32", "m")
    assert not (tmp_path / "models/gguf").exists() and not (tmp_path / "m.gguf").exists()


def test_stage_refuses_a_rope_model_with_one_line_and_no_output(tmp_path):
    enc = train_bpe(["abc abd abe"], 300)
    fingerprint = save_tokenizer(enc, tmp_path / "data/tokenizer", "bpe")
    model = GPT(replace(PRESETS["cpu-tiny"], vocab_size=enc.n_vocab, pos_emb="rope"))
    save_model(
        tmp_path / "models/dpo", model, tokenizer={"path": "data/tokenizer", "fingerprint": fingerprint}
    )
    done = stage_export(tmp_path, {"parity_tokens": 16})  # every format, gguf first
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: {ARCHITECTURE_REFUSALS[0][1]}"]
    assert not (tmp_path / "models/gguf").exists() and not (tmp_path / "reports").exists()


def test_stage_refuses_parity_tokens_beyond_the_context_before_any_format_writes(tmp_path):
    enc = train_bpe(["abc abd abe"], 300)
    fingerprint = save_tokenizer(enc, tmp_path / "data/tokenizer", "bpe")
    model = GPT(replace(PRESETS["cpu-tiny"], vocab_size=enc.n_vocab))
    save_model(
        tmp_path / "models/dpo", model, tokenizer={"path": "data/tokenizer", "fingerprint": fingerprint}
    )
    done = stage_export(tmp_path, {"parity_tokens": model.cfg.context_length})  # gguf would run first
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: export.parity_tokens={model.cfg.context_length} must be in 1..{model.cfg.context_length - 1} "
        f"(context_length {model.cfg.context_length} holds a prompt and the generated tokens)"
    ]
    assert not (tmp_path / "models/gguf").exists() and not (tmp_path / "reports").exists()


def test_a_classifier_is_refused_before_anything_is_written(tmp_path):
    enc = train_char(["abc"], 272)
    fingerprint = save_tokenizer(enc, tmp_path / "data/tokenizer", "char")
    model = GPT(replace(PRESETS["cpu-tiny"], vocab_size=enc.n_vocab, n_classes=2, tie_weights=False))
    save_model(
        tmp_path / "models/classifier",
        model,
        tokenizer={"path": str(tmp_path / "data/tokenizer"), "fingerprint": fingerprint},
    )
    with pytest.raises(PipelineError, match=r"classifier has no place .* export.formats: \[onnx\]"):
        export_gguf(
            tmp_path / "models/classifier",
            tmp_path / "data/tokenizer",
            tmp_path / "data/shards",
            tmp_path / "models/gguf",
            ExportParams(),
        )
    assert not (tmp_path / "models/gguf").exists()
