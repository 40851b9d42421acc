"""The Llama family, in and out, on real library code: random models built with transformers' own config classes
at SmolLM2-135M's, Llama 3.2's (GQA, rope scaling), Qwen3-0.6B's (q/k norms, wide heads) and Qwen2's (qkv bias)
layouts scaled down load through model.init_from's reader with transformers' logits (one file or sharded);
each round trip goes on through LoRA fine-tuning, the Hugging Face export (transformers loads it, same logits
and greedy tokens) and the GGUF export (llama.cpp, in a child process, tokenizes as we do and agrees top-1).
One test maps Qwen3-0.6B at full shape on the meta device (no weights allocated) and checks the memory figure."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from pipeline.common.config import ExportParams, LoRAParams, parse_params
from pipeline.common.errors import PipelineError
from pipeline.data import chat_template, tokenizer_json
from pipeline.data.prompts import chat_prompt_ids, encode_prompt, encode_response, resolve
from pipeline.data.shards import ShardDataset
from pipeline.data.tokenizer import SPECIAL_TOKENS, read_metadata, train_bpe
from pipeline.export.gguf import export_gguf
from pipeline.export.gguf_check import runtime_name
from pipeline.export.hf import export_hf_model
from pipeline.model import gpt2_weights, llama_layout, lora
from pipeline.model.checkpoint import load_model, save_model
from pipeline.model.generate import stream_tokens
from pipeline.model.gpt import GPT, PRESETS, GPTConfig
from pipeline.model.sampling import SamplingOptions
from tests.helpers.hf_tokenizers import CHAT_TEMPLATES, CHATML, LLAMA3_SPECIALS, trained, write_config
from tests.helpers.project import make_project, venv_env
from tests.helpers.workspace import tokenize_corpus

VOCAB = 512
CONTEXT = 64
# The real families' layouts, scaled down (ratios of heads, key/value heads and widths kept).
FAMILIES = {
    # SmolLM2-135M: 9 heads, 3 key/value heads, tied, rope_theta 1e5
    "smollm2": (
        LlamaConfig,
        LlamaForCausalLM,
        {
            "hidden_size": 48,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "rope_theta": 100000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
        },
    ),
    # Llama 3.2 1B: 4 query heads per key/value head, rope_theta 5e5 and Llama 3's frequency scaling (its
    # original context scaled down with the rest, so that some frequencies are kept, some blended, some slowed)
    "llama3": (
        LlamaConfig,
        LlamaForCausalLM,
        {
            "hidden_size": 128,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "intermediate_size": 256,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 48,
            },
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
        },
    ),
    # Qwen3-0.6B: heads wider than hidden / heads (128 vs 64), q/k RMSNorm, eps 1e-6, rope_theta 1e6
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "intermediate_size": 192,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
        },
    ),
    # Qwen2: q, k and v biases, an untied head
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 160,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        },
    ),
}


def hf_model(family: str, seed: int = 0, vocab_size: int = VOCAB, context: int = CONTEXT):
    """A transformers model of ``family``'s layout, every parameter (norms and biases too) random."""
    config_class, model_class, shape = FAMILIES[family]
    config = config_class(
        vocab_size=vocab_size,
        num_hidden_layers=2,
        max_position_embeddings=context,
        attention_dropout=0.0,
        **shape,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def trained_hf_model(family: str, shards: Path, vocab_size: int = VOCAB):
    """``family``'s model trained 40 seeded steps on the shards by transformers itself: peaked next-token
    distributions, as a real base has (a random model's near-ties would make top-1 comparisons a coin toss)."""
    model = hf_model(family, vocab_size=vocab_size).train()
    train = ShardDataset(shards, "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        x, y = train.sample(8, CONTEXT, generator)
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def init_from(directory: Path) -> GPT:
    """model.init_from's reader on a transformers directory: its config, then its weights."""
    source = gpt2_weights.resolve(str(directory))
    cfg = GPTConfig(**gpt2_weights.config_from_hf(source))
    return gpt2_weights.load_weights(source, cfg).eval()


@torch.inference_mode()
def max_logit_diff(ours: GPT, theirs, seed: int = 1) -> float:
    ids = torch.randint(0, ours.cfg.vocab_size, (3, CONTEXT), generator=torch.Generator().manual_seed(seed))
    return float((ours(ids)[0] - theirs(ids).logits).abs().max())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, corpus_text) -> Path:
    """A bpe tokenizer of VOCAB tokens trained on the Quijote and its shards (validation ≥ 2,048 positions)."""
    root = tmp_path_factory.mktemp("llama-family")
    enc = train_bpe([corpus_text], VOCAB)
    tokenize_corpus(root, corpus_text, enc, "bpe", 0.6)
    return root


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("sharded", [False, True])
def test_init_from_reads_each_family_with_transformers_logits(family, sharded, tmp_path, capsys):
    theirs = hf_model(family)
    theirs.save_pretrained(tmp_path / family, max_shard_size="40KB" if sharded else "1GB")
    assert (tmp_path / family / "model.safetensors.index.json").is_file() == sharded
    ours = init_from(tmp_path / family)
    expected = {"smollm2": (2, False), "llama3": (2, False), "qwen3": (2, True), "qwen2": (2, False)}[family]
    assert (ours.cfg.kv_heads, ours.cfg.qk_norm) == expected
    diff = max_logit_diff(ours, theirs)
    with capsys.disabled():
        print(f"\n{family} (sharded {sharded}): max |logit(ours) - logit(transformers)| = {diff:.2e}")
    assert diff < 1e-4
    # our KV-cache greedy decoding = transformers' greedy generate
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    mine = [int(t) for t in stream_tokens(ours, prompt, SamplingOptions(max_new_tokens=24, temperature=0.0))]
    out = theirs.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None)
    assert out[0, 8:].tolist() == mine


def test_rope_scaling_matters_and_is_read_from_both_config_layouts(tmp_path):
    theirs = hf_model("llama3")
    theirs.save_pretrained(tmp_path / "llama3")
    ours = init_from(tmp_path / "llama3")
    assert ours.cfg.rope_scaling == (32.0, 1.0, 4.0, 48)
    unscaled = GPT(replace(ours.cfg, rope_factor=1.0)).eval()
    unscaled.load_state_dict(ours.state_dict())
    assert max_logit_diff(unscaled, theirs) > 1e-3  # without the scaling, the logits differ
    modern = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1}
    modern |= {"vocab_size": 8, "intermediate_size": 16}
    modern["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "original_max_position_embeddings": 64,
    }
    fields = llama_layout.config_from_hf(modern, "config.json")
    assert (fields["rope_base"], fields["rope_factor"], fields["rope_original_context"]) == (5e5, 8.0, 64)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"hidden_act": "gelu"}, "config.json: hidden_act='gelu' is not supported (our GPT computes 'silu')"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "config.json: rope_scaling='yarn' is not supported (our GPT computes 'default')",
        ),
        ({"model_type": "mistral"}, "config.json: model_type 'mistral' is not one of llama, qwen2, qwen3"),
    ],
)
def test_unsupported_llama_configs_are_one_line(edit, message):
    hf = hf_model("smollm2").config.to_dict() | edit
    with pytest.raises(PipelineError) as exc:
        llama_layout.config_from_hf(hf, "config.json")
    assert str(exc.value) == message


def test_a_foreign_base_without_our_tokenizer_is_refused_in_one_line(tmp_path):
    hf_model("qwen3").save_pretrained(tmp_path / "qwen3")
    source = gpt2_weights.resolve(str(tmp_path / "qwen3"))
    with pytest.raises(PipelineError) as exc:
        gpt2_weights.checkpoint_config(source, VOCAB, {"kind": "bpe", "fingerprint": "f" * 64}, None)
    assert str(exc.value).startswith(
        f"model.init_from={tmp_path / 'qwen3'}: a qwen3 base needs its own tokenizer"
    )


def test_qwen3_full_shape_maps_on_the_meta_device_and_the_memory_check_names_the_figure():
    """Qwen3-0.6B's real config: every tensor maps (shapes only, nothing allocated) and the parameter count is
    transformers' own; the memory check refuses with the figure before any weight is read."""
    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        theirs = Qwen3ForCausalLM(config)
    state = {k: v for k, v in theirs.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    cfg = GPTConfig(**llama_layout.config_from_hf(config.to_dict(), "config.json"))
    assert cfg == PRESETS["qwen3-0.6b"]  # the preset is the checkpoint's shape
    ours = llama_layout.from_hf(state, cfg, "qwen3-0.6b")
    with torch.device("meta"):
        model = GPT(cfg)
    reference = {k: v.shape for k, v in model.state_dict().items() if k != "out_head.weight"}
    assert {k: v.shape for k, v in ours.items()} == reference
    n_params = sum(p.numel() for p in theirs.parameters())  # transformers counts the tied matrix once
    assert gpt2_weights.param_count(cfg) == n_params == 596_049_920
    back = llama_layout.to_hf(ours, cfg)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}
    needed = gpt2_weights.training_bytes(cfg, True, 8, 1024)
    with pytest.raises(PipelineError) as exc:
        gpt2_weights.check_fits(cfg, "Qwen/Qwen3-0.6B-Base", needed, 4 * 2**30, "cpu", True)
    assert str(exc.value).startswith(
        f"model.init_from=Qwen/Qwen3-0.6B-Base: 596M parameters need about {needed / 2**30:.1f} GiB"
    )
    assert "but cpu has 4.0 GiB free" in str(exc.value)


def lora_steps(model: GPT, shards: Path, steps: int = 5, chats: torch.Tensor | None = None) -> GPT:
    """A few LoRA steps on the shards (rank 4 on attention and MLP), merged back: the fine-tuning half of the trip;
    with ``chats`` (rows of prompt + answer ids, CONTEXT + 1 long), SFT steps on them after the shard steps."""
    model = lora.apply_lora(model.train(), LoRAParams(rank=4, alpha=8.0), "test", seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    train = ShardDataset(shards, "train")
    generator = torch.Generator().manual_seed(1)
    batches = [train.sample(8, CONTEXT, generator) for _ in range(steps)]
    if chats is not None:
        batches += [(chats[:, :-1], chats[:, 1:])] * steps
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return lora.merge(model).eval()


# Each family's own tokenizer: its pre-tokenizer, its special tokens (first in SmolLM2's vocabulary, after the BPE
# vocabulary in Llama 3's and Qwen's), llama.cpp's name for the pre-tokenizer
FAMILY_TOKENIZERS = {
    "smollm2": ("smollm2", CHATML, True, "smollm"),
    "llama3": ("llama3", LLAMA3_SPECIALS, False, "llama-bpe"),
    "qwen3": ("qwen", CHATML, False, "qwen2"),
}
FAMILY_TEMPLATES = {
    "smollm2": "chatml",
    "llama3": "llama3",
    "qwen3": "qwen3",
}  # tests/helpers/hf_tokenizers.py
SFT_CHATS = [
    ([("user", "¿Quién es Sancho?")], "El escudero."),
    (
        [("system", "Sé breve."), ("user", "Hi"), ("assistant", "Hola."), ("user", "¿Y Rocinante?")],
        "Un caballo.",
    ),
]


def native_sft_rows(enc, template) -> torch.Tensor:
    """SFT_CHATS in the base's own template (prompt + answer ids), cut or padded with EOT to CONTEXT + 1."""
    rows = []
    for messages, answer in SFT_CHATS:
        *context, (_, last) = messages
        ids = encode_prompt(enc, last, "", template, context) + encode_response(
            enc, answer, template, last, "", context
        )
        rows.append((ids + [enc.eot_token] * CONTEXT)[: CONTEXT + 1])
    return torch.tensor(rows)


@pytest.mark.parametrize("family", list(FAMILY_TOKENIZERS))
def test_round_trip_transformers_lora_hf_and_gguf(family, corpus_text, tmp_path, capsys):
    """With the family's own tokenizer.json (trained by `tokenizers` on the Quijote, tokenizer.kind hf):
    transformers → init_from (parity) → LoRA SFT (in the base's own chat template, from its tokenizer_config.json:
    template native) → HF export (transformers parity, tokenizer, greedy; its apply_chat_template gives our prompt
    ids) → init_from of the export bit for bit → GGUF (llama.cpp's pre-tokenizer for the family gives our ids; its
    tokenizer.chat_template, rendered by llama-cpp-python, our prompt ids; top-1 agreement per type)."""
    pre, specials, first, llama_cpp_pre = FAMILY_TOKENIZERS[family]
    path = trained(corpus_text[:100_000], pre, specials, tmp_path / "base", VOCAB - 32, specials_first=first)
    config = write_config(tmp_path / "base", *CHAT_TEMPLATES[FAMILY_TEMPLATES[family]])
    enc, meta = tokenizer_json.read(path)
    meta["chat_template"] = chat_template.read_config(config)
    fingerprint, _ = tokenize_corpus(
        tmp_path, corpus_text, enc, "hf", 0.6, source=str(tmp_path / "base"), **meta
    )
    template = resolve("native", read_metadata(tmp_path / "data/tokenizer"), enc, "sft.template")
    shards, tokenizer = tmp_path / "data/shards", tmp_path / "data/tokenizer"
    theirs = trained_hf_model(family, shards, enc.n_vocab)
    theirs.save_pretrained(tmp_path / "base")
    ours = init_from(tmp_path / "base")
    init_diff = max_logit_diff(ours, theirs)
    assert init_diff < 1e-4
    tuned = lora_steps(ours, shards, chats=native_sft_rows(enc, template))
    assert max_logit_diff(tuned, theirs) > 1e-3  # the fine-tuning changed the model
    save_model(
        tmp_path / "models/sft",
        tuned,
        tokenizer={"path": str(tokenizer), "fingerprint": fingerprint},
        instructions={"template": "native", **template.record()},
    )
    params = ExportParams(parity_tokens=24, gguf_types=("f32", "f16", "q8_0"))
    hf = export_hf_model(tmp_path / "models/sft", tokenizer, shards, tmp_path / "models/hf", params)
    config = json.loads((tmp_path / "models/hf/config.json").read_text())
    assert config["architectures"] == [llama_layout.MODEL_TYPES["qwen3" if family == "qwen3" else "llama"]]
    assert hf["passed"] and hf["max_abs_logit_diff"] < 1e-4 and hf["greedy_tokens_matched"] == 24
    assert hf["chat_template_matches"] is True
    exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "models/hf")
    base_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    for messages, answer in SFT_CHATS:
        chat = [{"role": r, "content": c} for r, c in messages]
        ours_ids = chat_prompt_ids(enc, template, messages)
        for tok in (exported_tokenizer, base_tokenizer):
            kwargs = {"return_dict": False, "enable_thinking": False}  # as template native renders
            assert tok.apply_chat_template(chat, add_generation_prompt=True, **kwargs) == ours_ids
            full = tok.apply_chat_template([*chat, {"role": "assistant", "content": answer}], **kwargs)
            *context, (_, last) = messages
            assert full == ours_ids + encode_response(enc, answer, template, last, "", context)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "models/hf", dtype=torch.float32).eval()
    assert max_logit_diff(tuned, exported) < 1e-4
    source = gpt2_weights.resolve(str(tmp_path / "models/hf"))
    cfg = gpt2_weights.checkpoint_config(
        source, enc.n_vocab, {"kind": "hf", "fingerprint": fingerprint}, None
    )
    back = gpt2_weights.load_weights(source, cfg)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in tuned.state_dict().items())
    figures = {"init_from": init_diff, "hf": hf["max_abs_logit_diff"]}
    if runtime_name() is not None:  # llama.cpp verifies in a child process (test_gguf.py requires it)
        gguf = export_gguf(tmp_path / "models/sft", tokenizer, shards, tmp_path / "models/gguf", params)
        assert gguf["pre_tokenizer"] == llama_cpp_pre and gguf["template"] == "native"
        for kind, minimum in (("f32", 0.99), ("f16", 0.98), ("q8_0", 0.95)):
            assert gguf[kind]["passed"] and gguf[kind]["tokenizer_identical"], gguf[kind]
            assert gguf[kind]["top1_agreement"] >= minimum and gguf[kind]["chat_template_matches"] is True
            figures[f"gguf_{kind}_top1"] = gguf[kind]["top1_agreement"]
            figures[f"gguf_{kind}_max_logit_diff"] = gguf[kind]["max_abs_logit_diff"]
    with capsys.disabled():
        print(f"\n{family} round trip:", json.dumps(figures))


def test_our_llama_shapes_load_in_transformers_and_the_rest_are_refused_in_one_line(workspace, tmp_path):
    """A from-scratch model with rope, RMSNorm and SwiGLU leaves as Llama, biases included (attention_bias,
    mlp_bias; llama.cpp's llama graph loads them too); a rope model with LayerNorm, or Qwen3 with MLP biases,
    cannot, in one line."""
    tokenizer, shards = workspace / "data/tokenizer", workspace / "data/shards"
    fingerprint = json.loads((tokenizer / "metadata.json").read_text())["fingerprint"]
    base = dict(vocab_size=VOCAB, context_length=CONTEXT, n_embd=64, n_head=4, n_layer=2, pos_emb="rope")
    params = ExportParams(parity_tokens=16)
    cases = {
        "biased": (dict(norm="rmsnorm", mlp="swiglu", qkv_bias=True), None),
        "layernorm": (
            dict(mlp="swiglu"),
            "model.norm=layernorm: the Hugging Face Llama format cannot hold LayerNorm",
        ),
        "qwen3-bias": (
            dict(norm="rmsnorm", mlp="swiglu", qk_norm=True),
            "model.bias=true: the Hugging Face Llama format cannot hold Qwen3's (qk_norm) out_proj or MLP biases",
        ),
    }
    for name, (options, refusal) in cases.items():
        torch.manual_seed(0)
        save_model(
            tmp_path / name,
            GPT(GPTConfig(**base, **options)).eval(),
            tokenizer={"path": str(tokenizer), "fingerprint": fingerprint},
        )
        if refusal is None:
            metrics = export_hf_model(tmp_path / name, tokenizer, shards, tmp_path / f"{name}-hf", params)
            assert metrics["passed"] and metrics["max_abs_logit_diff"] < 1e-4
            config = json.loads((tmp_path / f"{name}-hf/config.json").read_text())
            assert config["attention_bias"] and config["mlp_bias"]
            assert load_model(tmp_path / name)[0].cfg.bias
            if runtime_name() is not None:  # llama.cpp's llama graph takes the optional biases too
                only_f32 = replace(params, gguf_types=("f32",))
                gguf = export_gguf(tmp_path / name, tokenizer, shards, tmp_path / f"{name}-gguf", only_f32)
                assert gguf["f32"]["passed"] and gguf["f32"]["top1_agreement"] >= 0.99
        else:
            with pytest.raises(PipelineError) as exc:
                export_hf_model(tmp_path / name, tokenizer, shards, tmp_path / f"{name}-hf", params)
            assert str(exc.value).startswith(refusal) and "\n" not in str(exc.value)
            assert not (tmp_path / f"{name}-hf").exists()


def _stage(project: Path, name: str, **sections: dict) -> subprocess.CompletedProcess:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        params[section] = {**(params.get(section) or {}), **values}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**venv_env(), "PYTHONPATH": str(project), "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}"],
        cwd=project,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("family", "pre", "specials", "spare"),
    [("qwen3", "qwen", CHATML, 64), ("smollm2", "smollm2", LLAMA3_SPECIALS, 0)],
)
def test_a_base_comes_in_through_the_tokenize_and_pretrain_stages(
    tmp_path, corpus_text, family, pre, specials, spare
):
    """The base's tokenizer.json (trained by `tokenizers` on the Quijote; ChatML- or Llama-3-style special tokens)
    becomes data/tokenizer (tokenizer.kind hf, proven on the corpus); pretrain's init_from then loads the base
    with it, and models/base gives transformers' logits. Qwen3 keeps its spare embedding rows; SmolLM2's full
    vocabulary grows by our special tokens (mean rows)."""
    base = tmp_path / "base"
    trained(corpus_text[:100_000], pre, specials, base, vocab_size=1000, specials_first=family == "smollm2")
    write_config(base, *CHAT_TEMPLATES["qwen3" if family == "qwen3" else "llama3"])
    model_tokens = Tokenizer.from_file(str(base / "tokenizer.json")).get_vocab_size()
    appended = len(
        [t for t in SPECIAL_TOKENS if t not in specials]
    )  # ours the base lacks (<|endoftext|>: ChatML has it)
    # a context with room for the Llama 3 template's dated system header around an instruction
    theirs = hf_model(family, vocab_size=model_tokens + spare, context=256)
    theirs.save_pretrained(base)
    project = make_project(tmp_path / "p")
    assert _stage(project, "download").returncode == 0
    done = _stage(project, "tokenize", tokenizer={"kind": "hf", "source": str(base)})
    assert done.returncode == 0, done.stderr[-2000:]
    meta = read_metadata(project / "data/tokenizer")
    assert (
        meta["kind"] == "hf"
        and meta["model_tokens"] == model_tokens
        and meta["vocab_size"] == model_tokens + appended
    )
    recorded = meta["chat_template"]  # tokenizer_config.json's, for sft.template: native
    assert recorded["file"] == str(base / "tokenizer_config.json") and len(recorded["sha256"]) == 64
    pretrain = {
        "max_steps": 0,
        "batch_size": 2,
        "context_length": 256,
        "eval_batches": 1,
        "dtype": "fp32",
    }
    done = _stage(
        project, "pretrain", model={"init_from": str(base), "context_length": 256}, pretrain=pretrain
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ours = load_model(project / "models/base")[0]
    assert ours.cfg.vocab_size == max(model_tokens + spare, model_tokens + appended)
    ids = torch.randint(0, model_tokens, (2, CONTEXT), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        diff = (ours(ids)[0][..., : model_tokens + spare] - theirs(ids).logits).abs().max()
    assert diff < 1e-4
    # SFT, then DPO, train and answer in the base's own chat template, as the stages' own processes
    done = _stage(project, "sft", sft={"template": "native", "max_new_tokens": 4})
    assert done.returncode == 0, done.stderr[-2000:]
    done = _stage(project, "dpo", dpo={"max_new_tokens": 4})
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("sft", "dpo"):
        tuned = json.loads((project / f"models/{stage}/config.json").read_text())["instructions"]
        assert tuned["template"] == "native" and len(tuned["chat_template_sha256"]) == 64
        answers = (project / f"reports/{stage}/responses.jsonl").read_text().splitlines()
        assert answers and all(isinstance(json.loads(line)["response"], str) for line in answers)
    # another tokenizer than the base's is refused in one line before any weight is read
    other = tmp_path / "other"
    trained(corpus_text[:50_000], pre, specials, other, vocab_size=900, specials_first=family == "smollm2")
    (project / "models/base").rename(project / "kept")
    assert _stage(project, "tokenize", tokenizer={"kind": "hf", "source": str(other)}).returncode == 0
    done = _stage(
        project, "pretrain", model={"init_from": str(base), "context_length": 256}, pretrain=pretrain
    )
    assert done.returncode == 1 and not (project / "models/base").exists()
    assert done.stderr.strip().splitlines() == [
        f"error: model.init_from={base}: data/tokenizer was made from another tokenizer.json than "
        f"{base / 'tokenizer.json'} (tokenizer.source {str(other)!r}); point tokenizer.source at the base"
    ]


@pytest.mark.parametrize(
    ("profile", "repo", "preset", "lora_rank"),
    [
        ("params-smollm2.yaml", "HuggingFaceTB/SmolLM2-135M", "smollm2-135m", 0),
        ("params-qwen3.yaml", "Qwen/Qwen3-0.6B-Base", "qwen3-0.6b", 16),
    ],
)
def test_family_profiles_are_valid_params_from_their_base(profile, repo, preset, lora_rank):
    """The profiles merge into valid params: the base's repo for both the tokenizer and the weights, LoRA where the
    base is too large for full fine-tuning on a CPU (its shape is the preset's: the memory figure below)."""
    root = Path(__file__).resolve().parents[2]
    merged = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in yaml.safe_load((root / profile).read_text()).items():
        merged[section] = {**(merged.get(section) or {}), **values}
    params = parse_params(merged, profile)
    assert params.tokenizer.kind == "hf" and params.tokenizer.source == params.model.init_from == repo
    assert params.sft.lora.rank == params.dpo.lora.rank == lora_rank
    full_sft = gpt2_weights.training_bytes(PRESETS[preset], True, params.sft.batch_size, 512)
    assert (full_sft > 8 * 2**30) == (lora_rank > 0)  # full AdamW fine-tuning of Qwen3-0.6B: > 8 GiB


def test_a_tensor_the_config_does_not_announce_is_refused_not_dropped():
    theirs = hf_model("smollm2")
    cfg = GPTConfig(**llama_layout.config_from_hf(theirs.config.to_dict(), "config.json"))
    state = dict(theirs.state_dict()) | {"model.layers.1.self_attn.o_proj.bias": torch.ones(48)}
    with pytest.raises(PipelineError) as exc:
        llama_layout.from_hf(state, cfg, "model.safetensors")
    assert str(exc.value) == (
        "model.safetensors: unexpected tensors for a 2-layer model: ['model.layers.1.self_attn.o_proj.bias']"
    )
    del state["model.layers.1.self_attn.o_proj.bias"], state["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(PipelineError, match=r"missing model.layers.0.mlp.up_proj.weight\)"):
        llama_layout.from_hf(state, cfg, "model.safetensors")
