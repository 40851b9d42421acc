"""The shared GPT core: shapes, causality, presets, weight tying, KV cache, safe model directories."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
import torch

from pipeline.common.errors import PipelineError
from pipeline.model.checkpoint import load_model, save_model
from pipeline.model.gpt import GPT, PRESETS, GPTConfig, ModelConfigError, config_from_preset, flops_per_token


@pytest.fixture
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, context_length=32, n_embd=32, n_head=4, n_layer=2)).eval()


def test_logits_shape(tiny):
    logits, present = tiny(torch.randint(0, 97, (3, 11)))
    assert logits.shape == (3, 11, 97)
    assert len(present) == 2 and present[0][0].shape == (3, 4, 11, 8)


def test_future_tokens_do_not_change_past_logits(tiny):
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 97
    a, _ = tiny(x)
    b, _ = tiny(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_kv_cache_continuation_matches_full_forward(tiny):
    x = torch.randint(0, 97, (2, 20))
    full, _ = tiny(x)
    first, past = tiny(x[:, :7])
    middle, past = tiny(x[:, 7:15], past=past)
    last, _ = tiny(x[:, 15:], past=past)
    assert torch.allclose(torch.cat([first, middle, last], dim=1), full, atol=1e-5)


def test_last_only_computes_the_final_position(tiny):
    x = torch.randint(0, 97, (2, 9))
    full, _ = tiny(x)
    last, _ = tiny(x, last_only=True)
    assert last.shape == (2, 1, 97)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_context_overflow_is_refused(tiny):
    with pytest.raises(ValueError, match="context_length=32"):
        tiny(torch.zeros(1, 33, dtype=torch.long))


def test_gpt2_124m_preset_matches_the_book():
    cfg = PRESETS["gpt2-124m"]
    assert (cfg.vocab_size, cfg.context_length, cfg.n_embd, cfg.n_head, cfg.n_layer) == (
        50257,
        1024,
        768,
        12,
        12,
    )
    with torch.device("meta"):
        model = GPT(cfg)
    assert 124e6 < model.num_params(non_embedding=False) < 125e6  # tied head: 124M, not the untied 163M


def test_weight_tying_is_optional():
    tied = GPT(GPTConfig(vocab_size=50, context_length=8, n_embd=16, n_head=2, n_layer=1))
    untied = GPT(
        GPTConfig(vocab_size=50, context_length=8, n_embd=16, n_head=2, n_layer=1, tie_weights=False)
    )
    assert tied.out_head.weight is tied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 50 * 16


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, context_length=16, n_embd=256, n_head=4, n_layer=8))
    assert abs(model.blocks[0].att.qkv.weight.std().item() - 0.02) < 2e-3
    assert abs(model.blocks[0].att.out_proj.weight.std().item() - 0.02 / 4) < 1e-3


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: config_from_preset("gpt5"), "unknown model preset 'gpt5'"),
        (lambda: GPTConfig(n_embd=100, n_head=3), "n_head=3 does not divide model.n_embd=100"),
        (lambda: GPTConfig(n_layer=0), "model.n_layer must be positive"),
    ],
)
def test_bad_shapes_name_the_field(build, message):
    with pytest.raises(ModelConfigError, match=message):
        build()


def test_flops_per_token_formula():
    cfg = GPTConfig(n_layer=2, n_embd=8, n_head=2)
    assert flops_per_token(cfg, n_params=1000, seq_len=4) == 6 * 1000 + 12 * 2 * 8 * 4


def test_optimizer_groups_decay_only_matrices(tiny):
    decay, no_decay = tiny.optimizer_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == tiny.num_params(
        non_embedding=False
    )


def test_model_directory_round_trip_stores_tied_head_once(tiny, tmp_path):
    save_model(tmp_path / "m", tiny, tokenizer={"fingerprint": "abc"})
    loaded, meta = load_model(tmp_path / "m")
    x = torch.randint(0, 97, (1, 5))
    assert torch.equal(loaded(x)[0], tiny(x)[0])
    assert meta["tokenizer"]["fingerprint"] == "abc"
    assert loaded.out_head.weight is loaded.tok_emb.weight
    weight_bytes = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert weight_bytes < tiny.num_params(non_embedding=False) * 4 + 16_384


def test_corrupt_or_mismatched_model_directory_is_refused(tiny, tmp_path):
    save_model(tmp_path / "m", tiny)
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PipelineError, match="model.safetensors: contents do not match the sha256 recorded"):
        load_model(tmp_path / "m")
    other = GPT(GPTConfig(vocab_size=97, context_length=32, n_embd=64, n_head=4, n_layer=2))
    save_model(tmp_path / "m", other)
    (tmp_path / "m" / "config.json").write_text(
        (tmp_path / "m" / "config.json").read_text().replace('"n_embd": 64', '"n_embd": 32')
    )
    with pytest.raises(PipelineError, match="config expects"):
        load_model(tmp_path / "m")


def test_model_directory_records_and_verifies_its_weights(tiny, tmp_path):
    save_model(tmp_path / "m", tiny, tokenizer={"path": "t", "fingerprint": "abc"})
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    weights = tmp_path / "m" / "model.safetensors"
    assert config["sha256"] == {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle - 1000 : middle + 1000] = bytes(
        2000
    )  # header intact, tensors garbled: safetensors still parses it
    weights.write_bytes(bytes(data))
    with pytest.raises(
        PipelineError, match=f"{weights}: contents do not match the sha256 recorded in config.json"
    ):
        load_model(tmp_path / "m")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(tokenizer="data/tokenizer"), "'tokenizer' must be a mapping"),
        (lambda c: c["model"].update(n_embd=64.0), "model.n_embd must be an integer"),
        (lambda c: c["model"].update(tie_weights="yes"), "model.tie_weights must be true or false"),
        (lambda c: c["model"].update(dropout="0.1"), "model.dropout must be in"),
        (lambda c: c.pop("sha256"), "no sha256 recorded for model.safetensors"),
        (lambda c: c.pop("model"), "not a model config"),
    ],
)
def test_model_config_fields_and_types_are_checked(tiny, tmp_path, edit, message):
    save_model(tmp_path / "m", tiny, tokenizer={"path": "t", "fingerprint": "abc"})
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(PipelineError, match=message) as exc:
        load_model(tmp_path / "m")
    assert str(path) in str(exc.value)


# ------------------------------------------------------------------------------------ architecture options
OPTIONS = {
    "rope": {"pos_emb": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu"},
    "qk_norm": {"qk_norm": True},
}
MODERN = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True}


def small(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, context_length=32, n_embd=32, n_head=4, n_layer=2, **options)).eval()


def test_default_is_gpt2_with_the_same_tensors_and_count_as_before():
    model = small()
    block = {
        "norm1.weight": (32,),
        "norm1.bias": (32,),
        "att.qkv.weight": (96, 32),
        "att.out_proj.weight": (32, 32),
        "att.out_proj.bias": (32,),
        "norm2.weight": (32,),
        "norm2.bias": (32,),
        "ff.fc.weight": (128, 32),
        "ff.fc.bias": (128,),
        "ff.proj.weight": (32, 128),
        "ff.proj.bias": (32,),
    }
    expected = {"tok_emb.weight": (97, 32), "pos_emb.weight": (32, 32)}
    expected |= {f"blocks.{i}.{name}": shape for i in range(2) for name, shape in block.items()}
    expected |= {"final_norm.weight": (32,), "final_norm.bias": (32,), "out_head.weight": (97, 32)}
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == list(expected.items())
    assert (model.num_params(), model.num_params(non_embedding=False)) == (28384, 29408)
    assert all(isinstance(m, torch.nn.LayerNorm) for m in (model.final_norm, model.blocks[0].norm1))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_changes_the_forward(name):
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    base, option = small(), small(**OPTIONS[name])
    shared = {
        k: v
        for k, v in base.state_dict().items()
        if k in option.state_dict() and option.state_dict()[k].shape == v.shape
    }
    option.load_state_dict(
        shared, strict=False
    )  # same weights where the shapes agree: the difference is the option
    assert not torch.allclose(base(x)[0], option(x)[0], atol=1e-4)


def test_option_tensors():
    rope = small(pos_emb="rope")
    assert rope.pos_emb is None and "pos_emb.weight" not in rope.state_dict()
    assert rope.num_params() == rope.num_params(non_embedding=False) == small().num_params()
    rms = small(norm="rmsnorm")
    assert all(
        isinstance(m, torch.nn.RMSNorm) for m in (rms.final_norm, rms.blocks[1].norm1, rms.blocks[1].norm2)
    )
    assert "final_norm.bias" not in rms.state_dict()
    swiglu = small(mlp="swiglu")
    assert (
        swiglu.blocks[0].ff.gate.weight.shape == swiglu.blocks[0].ff.fc.weight.shape == (64, 32)
    )  # 8/3·32 → 64
    assert (
        GPTConfig(n_embd=768, mlp="swiglu").mlp_hidden == 2048
        and GPTConfig(n_embd=256, n_head=4, mlp="swiglu").mlp_hidden == 704
    )
    wide = GPT(GPTConfig(vocab_size=8, context_length=8, n_embd=768, n_head=12, n_layer=1, mlp="swiglu"))
    gelu = GPT(GPTConfig(vocab_size=8, context_length=8, n_embd=768, n_head=12, n_layer=1))
    assert abs(wide.num_params() / gelu.num_params() - 1) < 0.01  # SwiGLU's width keeps the parameters
    assert (
        abs(wide.blocks[0].ff.proj.weight.std().item() - 0.02 / 2**0.5) < 2e-3
    )  # residual init scaled as GPT-2's
    qk = small(qk_norm=True)
    assert qk.state_dict()["blocks.0.att.q_norm.weight"].shape == (8,)
    assert small(mlp="relu2").state_dict().keys() == small().state_dict().keys()


@pytest.mark.parametrize("options", [MODERN, {"pos_emb": "rope"}, {"mlp": "relu2", "qk_norm": True}])
def test_kv_cache_matches_full_forward_with_options(options):
    model = small(**options)
    x = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    full, _ = model(x)
    first, past = model(x[:, :7])
    middle, past = model(x[:, 7:15], past=past)
    last, _ = model(x[:, 15:], past=past)
    assert torch.allclose(torch.cat([first, middle, last], dim=1), full, atol=1e-5)


def test_rope_is_relative_and_causal():
    """Attention scores of rotated q and k depend on the distance of their positions, not the positions."""
    from pipeline.model.gpt import apply_rope, rope_angles

    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i: int, j: int) -> float:
        return float(
            (
                apply_rope(q, *rope_angles(i, 1, 8, 10000.0, q.device))
                * apply_rope(k, *rope_angles(j, 1, 8, 10000.0, q.device))
            ).sum()
        )

    assert abs(score(5, 2) - score(13, 10)) < 1e-5 and abs(score(5, 2) - score(5, 4)) > 1e-3
    model = small(**MODERN)
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 97
    assert torch.allclose(model(x)[0][:, :10], model(y)[0][:, :10], atol=1e-6)


def test_options_train_under_bf16_autocast():
    model = small(**MODERN).train()
    x = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(x)
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pos_emb": "alibi"}, "model.pos_emb must be learned or rope, got 'alibi'"),
        ({"norm": "batchnorm"}, "model.norm must be layernorm or rmsnorm, got 'batchnorm'"),
        ({"mlp": "geglu"}, "model.mlp must be gelu, relu2 or swiglu, got 'geglu'"),
        ({"qk_norm": "yes"}, "model.qk_norm must be true or false, got 'yes'"),
        ({"rope_base": 0.0}, "model.rope_base must be a positive number, got 0.0"),
        ({"rope_base": True}, "model.rope_base must be a positive number, got True"),
        (
            {"pos_emb": "rope", "n_embd": 36, "n_head": 4},
            "model.pos_emb=rope rotates pairs .* must be even, got 9",
        ),
    ],
)
def test_bad_options_name_the_field(options, message):
    with pytest.raises(ModelConfigError, match=message):
        GPTConfig(**options)


def test_options_round_trip_through_the_model_directory_and_old_configs_load(tmp_path):
    model = small(**MODERN, rope_base=500.0)
    save_model(tmp_path / "m", model, tokenizer={"fingerprint": "abc"})
    loaded, meta = load_model(tmp_path / "m")
    assert loaded.cfg == model.cfg and meta["model"]["pos_emb"] == "rope"
    x = torch.randint(0, 97, (1, 9))
    assert torch.equal(loaded(x)[0], model(x)[0])
    old = {
        k: v
        for k, v in small().cfg.to_dict().items()
        if k not in ("pos_emb", "rope_base", "norm", "mlp", "qk_norm")
    }
    assert GPTConfig.from_dict(old) == small().cfg  # a checkpoint from before the options: GPT-2's defaults


def test_embeddings_read_the_hidden_states_of_every_option():
    from pipeline.model.embeddings import final_hidden_states

    for options in ({}, MODERN):
        model = small(**options)
        ids = [5, 17, 3, 88, 41]
        with torch.inference_mode():
            logits, _ = model(torch.tensor([ids]))
            assert torch.allclose(model.out_head(final_hidden_states(model, ids)), logits[0], atol=1e-5)


# The Llama family's shapes: SmolLM2 / Llama 3 (GQA, no biases, rope scaling) and Qwen3 (q/k norms, wide heads).
LLAMA = {
    "pos_emb": "rope",
    "norm": "rmsnorm",
    "mlp": "swiglu",
    "n_kv_head": 2,
    "hidden_dim": 80,
    "bias": False,
    "rope_base": 500000.0,
    "rope_factor": 32.0,
    "rope_original_context": 8192,
}
QWEN3 = {**MODERN, "n_kv_head": 2, "head_size": 16, "bias": False, "norm_eps": 1e-6, "rope_base": 1e6}
FAMILIES = {"gpt2": {}, "llama": LLAMA, "qwen3": QWEN3}
# sha256 over (name, bytes) of small()'s state dict, computed with the code before the Llama-family options
GPT2_DEFAULT_DIGEST = "2678d68f0dad2827eb3e9b8810230a8795dbc348089c2191615b90930499709b"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_decodes_through_the_kv_cache_as_the_full_forward(family):
    model = small(**FAMILIES[family])
    x = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    full, _ = model(x)
    first, past = model(x[:, :7])
    rest, past = model(x[:, 7:], past=past)
    assert torch.allclose(torch.cat([first, rest], dim=1), full, atol=1e-5)
    heads = model.cfg.kv_heads
    assert past[0][0].shape == (2, heads, 20, model.cfg.head_dim)  # GQA: the cache holds key/value heads only


def test_family_tensors_and_counts():
    llama = small(**LLAMA).state_dict()
    # q of 4 heads, k and v of 2, each 8 wide; no bias anywhere; SwiGLU at hidden_dim
    assert llama["blocks.0.att.qkv.weight"].shape == (64, 32) and llama["blocks.0.ff.gate.weight"].shape == (
        80,
        32,
    )
    assert not [k for k in llama if k.endswith(".bias")]
    qwen3 = small(**QWEN3)
    assert qwen3.state_dict()["blocks.0.att.qkv.weight"].shape == (
        128,
        32,
    )  # 4·16 + 2·2·16: heads wider than 32/4
    assert qwen3.blocks[0].att.out_proj.weight.shape == (32, 64) and qwen3.blocks[0].att.q_norm.eps == 1e-6
    assert qwen3.final_norm.eps == 1e-6
    assert GPTConfig(n_embd=32, n_head=4, head_size=16).head_dim == 16 and GPTConfig().kv_heads == 12


def test_llama3_rope_scaling_slows_only_the_long_wavelengths():
    from pipeline.model.gpt import llama3_frequencies

    inv_freq = 500000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    scaled = llama3_frequencies(inv_freq, (32.0, 1.0, 4.0, 8192))
    wavelen = 2 * torch.pi / inv_freq
    fast, slow = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert torch.equal(scaled[fast], inv_freq[fast]) and torch.allclose(scaled[slow], inv_freq[slow] / 32)
    between = ~fast & ~slow
    assert (
        between.any()
        and ((scaled[between] < inv_freq[between]) & (scaled[between] > inv_freq[between] / 32)).all()
    )
    assert small(**LLAMA).cfg.rope_scaling == (32.0, 1.0, 4.0, 8192) and small().cfg.rope_scaling is None


def test_gpt2_default_initial_weights_are_bit_identical_to_before_the_families():
    """The same seed gives GPT-2's defaults the same tensors as before the Llama options existed (digest taken
    from the code before them)."""
    digest = hashlib.sha256()
    for name, tensor in small().state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    assert digest.hexdigest() == GPT2_DEFAULT_DIGEST


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_kv_head": 3}, "model.n_kv_head=3 must divide model.n_head=4"),
        ({"n_kv_head": 0}, "model.n_kv_head must be a positive integer or null, got 0"),
        ({"head_size": 2.5}, "model.head_size must be a positive integer or null, got 2.5"),
        ({"norm_eps": 0}, "model.norm_eps must be a positive number, got 0"),
        ({"bias": "no"}, "model.bias must be true or false, got 'no'"),
        ({"rope_factor": 8.0, "rope_high_freq_factor": 1.0}, "model.rope_high_freq_factor=1.0 must exceed"),
        ({"rope_original_context": 0}, "model.rope_original_context must be a positive integer, got 0"),
    ],
)
def test_bad_family_options_name_the_field(options, message):
    with pytest.raises(ModelConfigError, match=message):
        GPTConfig(n_embd=32, n_head=4, **options)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lora_and_the_classifier_head_serve_each_family(family):
    from pipeline.common.config import LoRAParams
    from pipeline.model import lora
    from pipeline.model.gpt import last_token_logits

    model = small(**FAMILIES[family])
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    before = model(x)[0]
    wrapped = lora.apply_lora(model, LoRAParams(rank=2, alpha=4.0), "test", seed=0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.1)
    adapted = wrapped(x)[0]
    assert not torch.allclose(adapted, before, atol=1e-4)
    assert torch.allclose(lora.merge(wrapped)(x)[0], adapted, atol=1e-5)
    torch.manual_seed(0)
    classifier = GPT(replace(small(**FAMILIES[family]).cfg, n_classes=3, tie_weights=False)).eval()
    assert last_token_logits(classifier, x, torch.tensor([12, 5])).shape == (2, 3)


def test_llama_family_presets_have_their_published_parameter_counts():
    counts = {"smollm2-135m": 134_515_008, "llama3.2-1b": 1_235_814_400, "qwen3-0.6b": 596_049_920}
    for name, count in counts.items():
        with torch.device("meta"):  # shapes only: nothing allocated
            assert GPT(PRESETS[name]).num_params(non_embedding=False) == count


def test_cpu_medium_llama_keeps_cpu_mediums_size_in_the_llama_shape():
    """The default size in the family's shape: about cpu-medium's parameters with the default 4096 vocabulary."""
    with torch.device("meta"):
        gpt2 = GPT(replace(PRESETS["cpu-medium"], vocab_size=4096)).num_params(non_embedding=False)
        llama = GPT(replace(PRESETS["cpu-medium-llama"], vocab_size=4096))
    assert llama.num_params(non_embedding=False) == 11_899_776  # the default run's figure (BENCHMARKS.md)
    assert abs(llama.num_params(non_embedding=False) / gpt2 - 1) < 0.05
    cfg = llama.cfg
    assert (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.bias, cfg.kv_heads) == ("rope", "rmsnorm", "swiglu", False, 2)
