"""ONNX export: parity with torch, greedy equality, dynamic shapes, tied weights stored once, int8, bad input,
and generation in a process where torch cannot be imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipeline.common.config import ExportParams
from pipeline.common.errors import PipelineError
from pipeline.data.tokenizer import train_bpe
from pipeline.export.onnx import export_model
from pipeline.export.onnx_generate import OnnxGenerator
from pipeline.export.onnx_generate import filter_logits as np_filter_logits
from pipeline.model.checkpoint import CONFIG, load_model, save_model
from pipeline.model.generate import filter_logits, generate
from pipeline.model.gpt import GPT, PRESETS
from pipeline.model.sampling import SamplingOptions
from tests.helpers.workspace import tokenize_corpus, train_briefly

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ExportParams(parity_tokens=16)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, corpus_text) -> Path:
    """data/tokenizer, data/shards and a briefly trained tiny models/dpo (int8 agreement needs a real model)."""
    root = tmp_path_factory.mktemp("export")
    enc = train_bpe([corpus_text], 512)
    fingerprint, _ = tokenize_corpus(root, corpus_text, enc, "bpe", 0.9)
    torch.manual_seed(0)
    model = train_briefly(GPT(replace(PRESETS["cpu-tiny"], vocab_size=enc.n_vocab)), root / "data/shards", 30)
    save_model(root / "models/dpo", model, tokenizer={"path": "data/tokenizer", "fingerprint": fingerprint})
    return root


def run_export(
    root: Path, params: ExportParams = PARAMS, model: str = "dpo", out: str = "models/onnx"
) -> dict:
    return export_model(
        root / "models" / model, root / "data/tokenizer", root / "data/shards", root / out, params, 7
    )


@pytest.fixture(scope="module")
def exported(workspace) -> tuple[Path, dict]:
    return workspace / "models/onnx", run_export(workspace)


@pytest.fixture(scope="module")
def model(workspace) -> GPT:
    return load_model(workspace / "models/dpo")[0]


def test_export_writes_both_variants_tokenizer_config_and_card_with_passing_parity(exported):
    out, metrics = exported
    files = ["README.md", "config.json", "model.int8.onnx", "model.onnx", "tokenizer"]
    assert sorted(p.name for p in out.iterdir()) == files
    assert metrics["parity"]["passed"] and metrics["parity"]["max_abs_logit_diff"] <= PARAMS.parity_atol
    assert metrics["parity"]["greedy_tokens_matched"] == PARAMS.parity_tokens
    assert metrics["int8"]["top1_agreement"] >= PARAMS.int8_min_agreement
    assert metrics["int8"]["positions"] >= 64
    config = json.loads((out / "config.json").read_text())
    assert config["onnx"]["opset"] == 23
    assert config["onnx"]["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    assert "max |logit difference|" in (out / "README.md").read_text()


def test_exported_files_hold_no_path_of_this_checkout_or_environment(exported):
    """The exporter records Python stack traces per node; with them two checkouts exported different bytes."""
    out, _ = exported
    for file in sorted(p for p in out.rglob("*") if p.is_file()):
        data = file.read_bytes()
        for path in (str(ROOT), sys.prefix, str(Path(torch.__file__).parent)):
            assert path.encode() not in data, f"{file.name} holds {path}"


def test_a_changed_onnx_file_is_refused_naming_it(exported, tmp_path):
    out, _ = exported
    copy = tmp_path / "onnx"
    shutil.copytree(out, copy)
    assert OnnxGenerator(copy, "int8").vocab_size > 0
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(
        PipelineError, match=f"{copy / 'model.onnx'}: contents do not match the sha256 recorded"
    ):
        OnnxGenerator(copy, "fp32")


def test_tied_embedding_is_stored_once(exported, model):
    out, metrics = exported
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    vocab_by_width = [
        i
        for i in graph.initializer
        if list(i.dims)
        in ([model.cfg.vocab_size, model.cfg.n_embd], [model.cfg.n_embd, model.cfg.vocab_size])
    ]
    assert len(vocab_by_width) == 1
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())  # the tied matrix counted once
    stored = sum(onnx.numpy_helper.to_array(i).nbytes for i in graph.initializer)
    assert weight_bytes <= stored < weight_bytes + 4096  # + a few graph constants
    assert (out / "model.int8.onnx").stat().st_size < 0.5 * weight_bytes


@torch.inference_mode()
def test_dynamic_batch_and_sequence_with_kv_cache_match_torch(exported, model):
    out, _ = exported
    onnx_model = OnnxGenerator(out, "fp32")
    rng = np.random.default_rng(0)
    # Batch 1 takes a multi-token chunk after the prompt in one run, larger batches per token
    for batch in (
        3,
        1,
    ):
        ids = rng.integers(0, model.cfg.vocab_size, (batch, 11))
        logits, cache = onnx_model.forward(ids)
        ref, ref_cache = model(torch.from_numpy(ids))
        assert logits.shape == (batch, 11, model.cfg.vocab_size)
        assert cache.arrays()[0].shape == (batch, model.cfg.n_head, 11, model.cfg.head_dim)
        assert np.abs(logits - ref.numpy()).max() < 1e-4
        for width in (1, 5):
            step = rng.integers(0, model.cfg.vocab_size, (batch, width))
            logits, cache = onnx_model.forward(step, cache)
            ref, ref_cache = model(torch.from_numpy(step), past=ref_cache)
            assert logits.shape == (batch, width, model.cfg.vocab_size)
            assert np.abs(logits - ref.numpy()).max() < 1e-4
        assert cache.length == 17
        for ours, (key, _value) in zip(cache.arrays()[0::2], ref_cache, strict=False):
            assert np.abs(ours - key.numpy()).max() < 1e-4


def test_decode_writes_into_the_preallocated_buffers(exported, model):
    gen = OnnxGenerator(exported[0], "fp32")
    cache = gen.new_cache(1)
    pointers = [buffer.data_ptr() for buffer in cache.buffers]
    assert cache.buffers[0].shape() == [1, model.cfg.n_head, model.cfg.context_length, model.cfg.head_dim]
    _, cache = gen.forward(np.array([[1, 2, 3]]), cache)
    _, cache = gen.forward(np.array([[4]]), cache)
    assert [buffer.data_ptr() for buffer in cache.buffers] == pointers
    assert cache.length == 4 and np.abs(cache.arrays()[0][0, :, 3]).max() > 0
    with pytest.raises(ValueError, match="exceeds the cache"):
        gen.forward(np.zeros((1, model.cfg.context_length - 3), dtype=np.int64), cache)
    with pytest.raises(ValueError, match="rows"):
        gen.forward(np.zeros((2, 1), dtype=np.int64), cache)


def test_onnx_greedy_equals_torch_greedy_token_for_token(exported, model):
    out, _ = exported
    prompt = list(range(5, 15))
    opts = SamplingOptions(max_new_tokens=40, temperature=0)
    torch_tokens = generate(model, torch.tensor([prompt]), opts)[0, len(prompt) :].tolist()
    assert OnnxGenerator(out, "fp32").generate(prompt, opts) == torch_tokens
    assert len(torch_tokens) == 40


def test_sampling_options_seed_topk_eos_and_context_limit(exported):
    gen = OnnxGenerator(exported[0], "int8")
    prompt = gen.tokenizer.encode("En un lugar de la Mancha")
    opts = SamplingOptions(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    assert gen.generate(prompt, opts) == gen.generate(prompt, opts)
    assert gen.generate(prompt, opts) != gen.generate(prompt, replace(opts, seed=4))
    greedy = gen.generate(prompt, SamplingOptions(max_new_tokens=30, temperature=0))
    assert gen.generate(prompt, replace(opts, top_k=1)) == greedy
    eos = greedy[5]
    stopped = gen.generate(prompt, SamplingOptions(max_new_tokens=30, temperature=0, eos_id=eos))
    assert stopped == greedy[: greedy.index(eos) + 1]
    context = gen.context_length
    assert len(gen.generate([1] * (context - 4), SamplingOptions(max_new_tokens=30, temperature=0))) == 4
    with pytest.raises(ValueError, match="prompt_ids must be in"):
        gen.generate([gen.vocab_size], opts)


@pytest.mark.parametrize(
    "top_k,top_p", [(1, None), (7, None), (None, 0.5), (None, 0.95), (20, 0.8), (None, 1.0)]
)
def test_numpy_filter_keeps_the_same_tokens_as_torch(top_k, top_p):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(top_k or 0)) * 3
    ours = np.isfinite(np_filter_logits(logits.numpy(), top_k, top_p))
    assert np.array_equal(ours, torch.isfinite(filter_logits(logits, top_k, top_p)).numpy())


def test_generation_works_in_a_process_where_torch_cannot_be_imported(exported):
    out, _ = exported
    script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from pipeline.export.onnx_generate import OnnxGenerator
from pipeline.model.sampling import SamplingOptions
gen = OnnxGenerator({str(out)!r}, "int8")
ids = gen.tokenizer.encode("Dijo don Quijote a Sancho:")
tokens = gen.generate(ids, SamplingOptions(max_new_tokens=12, temperature=0.8, top_k=40, seed=5))
print(" ".join(map(str, tokens)))
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    tokens, modules = done.stdout.splitlines()
    gen = OnnxGenerator(out, "int8")
    ids = gen.tokenizer.encode("Dijo don Quijote a Sancho:")
    expected = gen.generate(ids, SamplingOptions(max_new_tokens=12, temperature=0.8, top_k=40, seed=5))
    assert tokens.split() == [str(t) for t in expected]
    assert modules == "['torch']"  # only the blocking entry: nothing imported torch


MODERN = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True}
# The Llama family's shapes: Llama 3 (GQA, no biases, rope scaling) and Qwen3 (GQA, wide heads, q/k norms)
LLAMA = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "bias": False}
LLAMA |= {"rope_base": 500000.0, "rope_factor": 8.0, "rope_original_context": 32}
QWEN3 = {**MODERN, "n_kv_head": 2, "head_size": 32, "bias": False, "norm_eps": 1e-6}


@pytest.mark.parametrize(("name", "options"), [("modern", MODERN), ("llama", LLAMA), ("qwen3", QWEN3)])
def test_architecture_options_export_with_parity(workspace, name, options):
    """Rope, RMSNorm, SwiGLU, qk-norm, grouped-query attention (the cache holds the key/value heads only) and wide
    heads trace into the graph: onnxruntime matches torch, greedy tokens too."""
    fingerprint = json.loads((workspace / "models/dpo" / CONFIG).read_text())["tokenizer"]["fingerprint"]
    cfg = replace(load_model(workspace / "models/dpo")[0].cfg, **options)
    torch.manual_seed(0)
    modern = train_briefly(GPT(cfg), workspace / "data/shards", 30)
    save_model(
        workspace / f"models/{name}", modern, tokenizer={"path": "data/tokenizer", "fingerprint": fingerprint}
    )
    metrics = run_export(
        workspace, replace(PARAMS, quantize_int8=False), model=name, out=f"models/onnx-{name}"
    )
    assert metrics["parity"]["passed"] and metrics["parity"]["max_abs_logit_diff"] < PARAMS.parity_atol
    assert metrics["parity"]["greedy_tokens_matched"] == PARAMS.parity_tokens
    config = json.loads((workspace / f"models/onnx-{name}" / CONFIG).read_text())
    assert config["model"]["pos_emb"] == "rope" and config["model"]["mlp"] == "swiglu"
    cache = OnnxGenerator(workspace / f"models/onnx-{name}").new_cache(1).buffers[0].numpy()
    assert cache.shape == (1, cfg.kv_heads, cfg.context_length, cfg.head_dim)


def test_failed_parity_leaves_nothing_behind(workspace):
    with pytest.raises(PipelineError, match="export parity failed") as failure:
        run_export(workspace, replace(PARAMS, parity_atol=1e-12, quantize_int8=False), out="models/failed")
    assert "\n" not in str(failure.value)
    assert not [p for p in (workspace / "models").iterdir() if "failed" in p.name]


def test_missing_checkpoint_and_mismatched_config_are_one_line_errors(workspace):
    with pytest.raises(PipelineError, match="models/base/config.json: model config not found"):
        run_export(workspace, model="base", out="models/never")
    broken = workspace / "models/sft"
    broken.mkdir()
    for name in ("model.safetensors", CONFIG):
        (broken / name).write_bytes((workspace / "models/dpo" / name).read_bytes())
    config = json.loads((broken / CONFIG).read_text())
    config["model"]["n_embd"] = 128
    (broken / CONFIG).write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="shape") as failure:
        run_export(workspace, model="sft", out="models/never")
    assert "\n" not in str(failure.value)
    config = json.loads((workspace / "models/dpo" / CONFIG).read_text())
    config["tokenizer"]["fingerprint"] = "0" * 64
    (broken / CONFIG).write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="trained with tokenizer 000000000000"):
        run_export(workspace, model="sft", out="models/never")
    assert not (workspace / "models/never").exists()


def test_stage_refuses_an_unsupported_opset_with_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "seed: 1\nexport:\n  opset: 26\n"
    )  # below 18: params.yaml's own check
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "stages.export"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: export.opset=26 is not supported: use 18..25 (the dynamo exporter writes opset ≥ 18; "
        f"onnxruntime {__import__('onnxruntime').__version__} runs up to 25)"
    ]
    assert not (tmp_path / "models").exists()
