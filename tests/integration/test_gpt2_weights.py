"""model.init_from: GPT-2 checkpoints written by transformers load into our GPT with equal logits (every key layout,
with and without our KV cache); the Hub path against a pre-filled Hugging Face cache; the pretrain stage continues
from them or writes them as they are; bad input is one line and leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.common.errors import PipelineError
from pipeline.common.profile import set_param_args
from pipeline.data.tokenizer import gpt2 as gpt2_tokenizer
from pipeline.model import gpt2_weights
from pipeline.model.gpt import GPT, GPTConfig
from tests.helpers.workspace import tokenize_corpus

GPT2_TOKENIZER = {"kind": "gpt2", "fingerprint": "f" * 64}
ENV = {
    **os.environ,
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
}


def random_gpt2(vocab_size: int, seed: int = 0, **shape) -> GPT2LMHeadModel:
    """A GPT2LMHeadModel whose every parameter (biases and LayerNorms too) is random, so no mapping error hides."""
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=shape.get("n_positions", 32),
        n_embd=shape.get("n_embd", 32),
        n_layer=shape.get("n_layer", 2),
        n_head=shape.get("n_head", 4),
        tie_word_embeddings=shape.get("tie", True),
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hub_layout(model: GPT2LMHeadModel, with_buffers: bool) -> dict[str, torch.Tensor]:
    """The Hub's original key layout: no 'transformer.' prefix; the .bin files also hold the attention-mask buffers."""
    state = {
        k.removeprefix("transformer."): v.clone()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    if with_buffers:
        n = model.config.n_positions
        for i in range(model.config.n_layer):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


def write_variants(model: GPT2LMHeadModel, root: Path) -> dict[str, Path]:
    """The same checkpoint as save_pretrained writes it, as a .bin-only copy, and in the Hub's two layouts."""
    saved = root / "saved"
    model.save_pretrained(saved)
    variants = {"save_pretrained": saved}
    copies = {
        "bin": ("pytorch_model.bin", model.state_dict()),
        "hub_safetensors": ("model.safetensors", hub_layout(model, with_buffers=False)),
        "hub_bin": ("pytorch_model.bin", hub_layout(model, with_buffers=True)),
    }
    for name, (filename, state) in copies.items():
        (root / name).mkdir()
        shutil.copy(saved / "config.json", root / name / "config.json")
        state = {k: v.contiguous() for k, v in state.items()}
        if filename.endswith(".bin"):
            torch.save(state, root / name / filename)
        else:
            save_file(state, str(root / name / filename), metadata={"format": "pt"})
        variants[name] = root / name
    return variants


def load_ours(path: str | Path, n_vocab: int, tokenizer: dict = GPT2_TOKENIZER) -> GPT:
    source = gpt2_weights.resolve(str(path))
    return gpt2_weights.load_weights(
        source, gpt2_weights.checkpoint_config(source, n_vocab, tokenizer, None)
    ).eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[GPT2LMHeadModel, dict[str, Path]]:
    model = random_gpt2(1000)
    return model, write_variants(model, tmp_path_factory.mktemp("gpt2"))


@pytest.mark.parametrize("variant", ["save_pretrained", "bin", "hub_safetensors", "hub_bin"])
def test_logits_equal_transformers_with_and_without_kv_cache(reference, variant):
    hf, paths = reference
    ours = load_ours(paths[variant], 1000)
    assert ours.cfg.qkv_bias and ours.cfg.tie_weights and ours.cfg.context_length == 32
    ids = torch.randint(0, 1000, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        full, _ = ours(ids)
        assert (full - expected).abs().max() <= 1e-5
        # The same positions through our KV cache: a 12-token prefill, one token, then a 7-token chunk.
        first, past = ours(ids[:, :12])
        one, past = ours(ids[:, 12:13], past=past)
        rest, _ = ours(ids[:, 13:], past=past)
        cached = torch.cat([first, one, rest], dim=1)
    assert (cached - expected).abs().max() <= 1e-5


def test_untied_head_and_extra_vocabulary_rows(tmp_path):
    hf = random_gpt2(50257, seed=3, n_embd=8, n_head=2, tie=False)
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_file(str(tmp_path / "model.safetensors"))
    ours = load_ours(tmp_path, 50272)  # GPT-2's ids + the 15 special tokens of our gpt2 kind
    assert not ours.cfg.tie_weights and ours.cfg.vocab_size == 50272
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids)[0][..., :50257] - hf(ids).logits).abs().max() <= 1e-5
    stored = hf.transformer.wte.weight.detach()
    for weight, original in (
        (ours.tok_emb.weight, stored),
        (ours.out_head.weight, hf.lm_head.weight.detach()),
    ):
        assert torch.equal(weight[:50257], original)
        assert torch.allclose(
            weight[50257:], original.mean(dim=0).expand(15, -1)
        )  # the documented initialisation


def test_param_count_matches_the_built_model():
    for cfg in (
        GPTConfig(vocab_size=300, context_length=16, n_embd=32, n_head=4, n_layer=3, qkv_bias=True),
        GPTConfig(vocab_size=300, context_length=16, n_embd=32, n_head=4, n_layer=2, tie_weights=False),
    ):
        assert gpt2_weights.param_count(cfg) == GPT(cfg).num_params(non_embedding=False)


def test_architecture_options_disagree_with_a_gpt2_checkpoint():
    with pytest.raises(
        PipelineError, match=r"model.pos_emb=rope disagrees with model.init_from=gpt2 \(pos_emb=learned\)"
    ):
        gpt2_weights.check_shape(GPTConfig(), {"n_layer": 12, "pos_emb": "rope"}, "gpt2")
    gpt2_weights.check_shape(GPTConfig(), {"mlp": "gelu", "qk_norm": False, "norm": None}, "gpt2")


class Payload:
    """Any object that is not a tensor: unpickling it needs this module's code."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def _bad(tmp_path: Path, case: str) -> tuple[str, int, dict]:
    """(init_from, n_vocab, tokenizer) of one bad input, files prepared under tmp_path."""
    good = tmp_path / "good"
    random_gpt2(1000).save_pretrained(good)
    if case == "unknown_name":
        return "gpt-9000", 1000, GPT2_TOKENIZER
    if case == "no_weights":
        (tmp_path / "empty").mkdir()
        shutil.copy(good / "config.json", tmp_path / "empty")
        return str(tmp_path / "empty"), 1000, GPT2_TOKENIZER
    if case == "llama":
        config = json.loads((good / "config.json").read_text())
        (good / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
        return str(good), 1000, GPT2_TOKENIZER
    if case == "pickle_code":
        (tmp_path / "evil").mkdir()
        shutil.copy(good / "config.json", tmp_path / "evil")
        torch.save({"wte.weight": torch.zeros(1), "payload": Payload()}, tmp_path / "evil/pytorch_model.bin")
        return str(tmp_path / "evil"), 1000, GPT2_TOKENIZER
    if case == "tokenizer_kind":
        return str(good), 1000, {"kind": "bpe", "fingerprint": "a" * 64}
    if case == "vocab_mismatch":
        return str(good), 50272, GPT2_TOKENIZER  # 1000 stored ids are not GPT-2's 50257
    raise AssertionError(case)


BAD = {
    "unknown_name": r"model.init_from='gpt-9000' is neither a known checkpoint \(scratch, gpt2, gpt2-medium",
    "no_weights": r"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in that directory",
    "llama": r"config.json: not a llama config \(no integer hidden_size, intermediate_size, num_hidden_layers",
    "pickle_code": r"pytorch_model.bin: refused, loading it would run pickled code",
    "tokenizer_kind": r"needs tokenizer.kind: gpt2 \(GPT-2's token ids\), got 'bpe'",
    "vocab_mismatch": r"vocab_size 1000 is not GPT-2's 50257 tokens",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_one_line(tmp_path, case, capsys):
    init_from, n_vocab, tokenizer = _bad(tmp_path, case)
    with pytest.raises(PipelineError, match=BAD[case]) as err:
        load_ours(init_from, n_vocab, tokenizer)
    assert "\n" not in str(err.value)
    assert "pickled code ran" not in capsys.readouterr().out


def test_size_check_refuses_what_cannot_fit():
    xl = GPTConfig(vocab_size=50272, context_length=1024, n_embd=1600, n_head=25, n_layer=48, qkv_bias=True)
    needed = gpt2_weights.training_bytes(xl, True, 8, 1024)
    assert (
        needed > 16 * gpt2_weights.param_count(xl) > 23 * 2**30
    )  # weights, gradients and AdamW alone: 23 GiB
    assert gpt2_weights.training_bytes(xl, False, 8, 1024) == 4 * gpt2_weights.param_count(xl)
    with pytest.raises(
        PipelineError,
        match=r"model.init_from=gpt2-xl: 1,558M parameters need about .* GiB for continuing "
        r"pretraining .* but cuda:0 has 24.0 GiB free",
    ):
        gpt2_weights.check_fits(xl, "gpt2-xl", needed, 24 * 2**30, "cuda:0", True)
    gpt2_weights.check_fits(xl, "gpt2-xl", needed, needed, "cpu", True)


# ------------------------------------------------------------------------------------------- the pretrain stage


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, corpus_text) -> Path:
    """data/tokenizer (kind gpt2) and data/shards of a small text; stages run with this as their working directory."""
    root = tmp_path_factory.mktemp("init-from")
    tokenize_corpus(root, corpus_text[:30_000], gpt2_tokenizer(), "gpt2", 0.8)
    hf = random_gpt2(50257, seed=5, n_positions=64, n_embd=16, n_head=2)
    hf.save_pretrained(root / "gpt2-local")
    # A pre-filled Hugging Face cache holding "openai-community/gpt2" at the pinned commit.
    repo, commit = gpt2_weights.NAMED["gpt2"]
    snapshot = root / "hf-home/hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    shutil.copytree(root / "gpt2-local", snapshot)
    (snapshot.parents[2] / "refs").mkdir()
    (snapshot.parents[2] / "refs/main").write_text(commit)
    return root


def stage(
    root: Path, workdir: str, model: dict, pretrain: dict, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the pretrain stage in a fresh copy of ``root``'s data with these params."""
    work = root / workdir
    shutil.copytree(root / "data", work / "data")
    params = {
        "seed": 3,
        "tokenizer": {"kind": "gpt2"},
        "model": model,
        "pretrain": {
            "batch_size": 2,
            "context_length": 32,
            "max_steps": 0,
            "warmup_steps": 0,
            "eval_every": 1,
            "eval_batches": 1,
            "checkpoint_every": 1,
            "log_every": 1,
            "dtype": "fp32",
            **pretrain,
        },
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run(
        [sys.executable, "-m", "stages.pretrain"],
        cwd=work,
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        timeout=300,
    )


def test_max_steps_zero_writes_the_checkpoint_as_it_is_with_provenance(workspace):
    done = stage(workspace, "as-is", {"init_from": str(workspace / "gpt2-local")}, {})
    assert done.returncode == 0, done.stderr[-2000:]
    model_dir = workspace / "as-is/models/base"
    meta = json.loads((model_dir / "config.json").read_text())
    weights = workspace / "gpt2-local/model.safetensors"
    assert meta["init_from"]["files"] == {"model.safetensors": gpt2_weights._sha256(weights)}
    assert (
        meta["model"]["vocab_size"] == 50272
        and meta["model"]["n_layer"] == 2
        and meta["training"]["steps"] == 0
    )
    assert (
        workspace / "as-is/checkpoints/pretrain"
    ).is_dir()  # DVC's declared output exists with no step taken
    ours = load_file(str(model_dir / "model.safetensors"))
    theirs = load_file(str(weights))
    assert torch.equal(ours["tok_emb.weight"][:50257], theirs["transformer.wte.weight"])
    assert torch.equal(ours["blocks.1.att.qkv.weight"], theirs["transformer.h.1.attn.c_attn.weight"].t())


def test_hub_name_from_a_prefilled_cache_offline_then_continues_pretraining(workspace):
    env = {"HF_HOME": str(workspace / "hf-home"), "HF_HUB_OFFLINE": "1"}
    done = stage(workspace, "hub", {"init_from": "gpt2"}, {"max_steps": 2, "lr": 1e-3}, env)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((workspace / "hub/models/base/config.json").read_text())
    repo, commit = gpt2_weights.NAMED["gpt2"]
    assert (
        meta["init_from"]["repo"] == repo
        and meta["init_from"]["revision"] == commit == meta["init_from"]["commit"]
    )
    assert len(meta["init_from"]["files"]["model.safetensors"]) == 64 and meta["training"]["steps"] == 2
    trained = load_file(str(workspace / "hub/models/base/model.safetensors"))["blocks.0.ff.fc.weight"]
    start = load_file(str(workspace / "gpt2-local/model.safetensors"))["transformer.h.0.mlp.c_fc.weight"].t()
    assert (
        0 < (trained - start).abs().max() < 0.1
    )  # moved by two small steps from GPT-2's weights, not re-initialised


STAGE_BAD = {
    "hub_unreachable": (
        {"init_from": "gpt2"},
        {"HF_HOME": "{root}/empty-hf-home", "HF_HUB_OFFLINE": "1"},
        r"openai-community/gpt2@607a30d783df config.json is not in the Hugging Face cache and the Hub cannot",
    ),
    "offline_no_cache": (
        {"init_from": "gpt2-medium"},
        {"HF_HOME": "{root}/hf-home", "HF_HUB_OFFLINE": "1"},
        r"openai-community/gpt2-medium@6dcaa7a952f7 config.json is not in the Hugging Face cache",
    ),
    "shape_disagrees": (
        {"init_from": "{root}/gpt2-local", "n_layer": 6},
        {},
        r"params.yaml: model.n_layer=6 disagrees with model.init_from=.*gpt2-local \(n_layer=2\)",
    ),
}


@pytest.mark.parametrize("case", sorted(STAGE_BAD))
def test_stage_bad_input_is_one_line_and_writes_nothing(workspace, case):
    model, env, pattern = STAGE_BAD[case]
    model = {k: v.format(root=workspace) if isinstance(v, str) else v for k, v in model.items()}
    env = {k: v.format(root=workspace) for k, v in env.items()}
    done = stage(workspace, f"bad-{case}", model, {}, env)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert not (workspace / f"bad-{case}/models").exists()


def test_book_profile_is_valid_params_and_starts_from_gpt2_medium():
    root = Path(__file__).resolve().parents[2]
    args = set_param_args(root / "params-book.yaml", root / "params.yaml")
    pairs = dict(a.lstrip("+").split("=", 1) for a in args[1::2])
    assert pairs["model.init_from"] == "gpt2-medium" and pairs["tokenizer.kind"] == "gpt2"
    assert (
        pairs["sft.lr"] == "5.0e-05" and pairs["sft.weight_decay"] == "0.1" and pairs["sft.batch_size"] == "8"
    )
    assert pairs["dpo.lr"] == "5.0e-06" and pairs["judge.style"] == "score100"
