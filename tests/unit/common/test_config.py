"""Every params key has a rule: the schema's fields are enumerated at run time, and each must have an invalid
example here that stops a stage with one `error:` line naming the key and exit 1. A field added later without
an example fails `test_invalid_value_is_one_line_naming_the_key[<its key>]`."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from pipeline.common.config import ConfigError, Params, Source, load_params, parse_params
from pipeline.common.errors import exit_on_error
from pipeline.common.profile import merge_params, set_param_args
from tests.helpers.project import ROOT, tiny_params

_TRAIN = {
    "batch_size": [0, 2.5],
    "grad_accum": [0],
    "max_steps": [-1],
    "lr": [0, -0.001, float("nan")],
    "min_lr_ratio": [1.5, -0.1],
    "warmup_steps": [-1],
    "weight_decay": [-1],
    "beta1": [1.5, 1.0, -0.1],
    "beta2": [1.0, "0.9x"],
    "grad_clip": [-1],
    "dtype": ["fp16"],
    "optimizer": ["sgd", 3],
    "compile": ["no"],
    "device": ["gpu", "cuda:x"],
    "eval_every": [0],
    "eval_batches": [0],
    "checkpoint_every": [0],
    "keep_checkpoints": [0],
    "log_every": [0],
    "keep": ["best", True],
    "seed": [-1, 2**32],
    "nproc_per_node": [0],
    "nnodes": [0],
    "rdzv_endpoint": ["node0", "node0:99999", "node0:0"],
    "parallel": ["zero3", 1],
    "max_restarts": [-1, 1.5],
    "rdzv_timeout": [0],
}

_LORA = {
    "rank": [-1],
    "alpha": [0],
    "dropout": [1.0],
    "targets": [[], ["attention", ""]],
    "merge": ["x"],
}
_TRAINED = {
    f"{section}.{key}": v
    for section in ("pretrain", "sft", "dpo", "classify")
    for key, v in [*_TRAIN.items(), *((f"lora.{k}", v) for k, v in _LORA.items())]
}

INVALID: dict[str, list] = {
    **_TRAINED,
    "seed": [-1, 2**32, "x"],
    "data.cache_dir": ["", 5],
    "data.timeout_s": [0, float("inf")],
    "data.retries": [-1, 1.5],
    "corpus.sources": [[], [""], "inputs/corpus.txt", [{"path": "inputs/corpus.txt", "colour": "red"}]],
    "corpus.sources[].location": [[{"path": ""}], [{"url": 5}]],
    "corpus.sources[].sha256": [[{"path": "inputs/corpus.txt", "sha256": "zz"}]],
    "corpus.sources[].format": [[{"path": "inputs/corpus.txt", "format": "xml"}]],
    "corpus.sources[].text_field": [[{"path": "inputs/corpus.txt", "text_field": ""}]],
    "corpus.sources[].member": [[{"path": "inputs/corpus.txt", "member": 3}]],
    "corpus.sources[].revision": [
        [{"path": "hf://datasets/a/b/c.parquet"}],
        [{"path": "inputs/corpus.txt", "revision": 1}],
    ],
    "corpus.sources[].where": [[{"path": "inputs/corpus.txt", "where": ["lang"]}]],
    "corpus.sources[].min_chars": [[{"path": "inputs/corpus.txt", "min_chars": -1}]],
    "corpus.sources[].bad_records": [[{"path": "inputs/corpus.txt", "bad_records": "ignore"}]],
    "corpus.strip_gutenberg": ["maybe"],
    "corpus.unwrap": ["sometimes", 1],
    "corpus.normalize": [1],
    "tokenizer.kind": ["wordpiece"],
    "tokenizer.vocab_size": [100, 2**31],
    "tokenizer.include_instruction_text": ["sometimes"],
    "tokenizer.train_bytes": [1000, -1],
    "tokenizer.seed": [-1],
    "tokenizer.source": ["", {"kind": "bpe", "source": "Qwen/Qwen3-0.6B"}],
    "tokenizer.revision": [""],
    "shards.val_fraction": [0, 1],
    "shards.shard_tokens": [0],
    "shards.batch_bytes": [-5],
    "model.preset": ["", 3],
    "model.init_from": ["", " "],
    "model.revision": [""],
    "model.init": ["xavier"],
    "model.context_length": [0],
    "model.n_embd": [64.5, -1],
    "model.n_head": [0, {"n_embd": 64, "n_head": 5}],
    "model.n_layer": [0],
    "model.dropout": [1.0, -0.1],
    "model.qkv_bias": ["no"],
    "model.tie_weights": [2],
    "model.pos_emb": ["alibi", True],
    "model.rope_base": [0, -1.5, "big"],
    "model.norm": ["batchnorm"],
    "model.mlp": ["geglu", 4],
    "model.qk_norm": ["yes"],
    "model.n_kv_head": [0],
    "model.head_size": [-8],
    "model.hidden_dim": [0],
    "model.bias": ["no"],
    "model.norm_eps": [0, -1e-6],
    "pretrain.context_length": [0],
    "pretrain.sampling": ["sequential"],
    "pretrain.stride": [0, {"sampling": "random", "stride": 32}],
    "pretrain.epochs": [0, {"sampling": "random", "epochs": 2}],
    "pretrain.mid_steps": [-1, {"max_steps": 4, "mid_steps": 5}],  # more mid-training steps than steps
    "pretrain.lora.rank": [-1, 4],  # > 0: LoRA needs trained weights, and pretrain starts from scratch
    "evaluate.batches": [0],
    "evaluate.batch_size": [0],
    "evaluate.prompts": [[""], ["ok", "   "], "En un lugar"],
    "evaluate.max_new_tokens": [-1],
    "evaluate.temperature": [-0.1],
    "evaluate.top_k": [0, -3],
    "evaluate.seed": [2**32],
    "evaluate.dtype": ["half"],
    "sft.data": ["", {"url": "inputs/sft.json", "bogus": 1}],
    "sft.template": ["llama"],
    "sft.mask_prompt": ["x"],
    "sft.strict": ["x"],
    "sft.split_train": [0, 1, {"split_train": 0.9, "split_val": 0.1}],
    "sft.split_val": [0],
    "sft.split_seed": [-1],
    "sft.max_new_tokens": [0],
    "sft.temperature": [-1],
    "sft.top_k": [0],
    "sft.repeat_penalty": [0, -1.2, "high"],
    "sft.repeat_last_n": [-2, 1.5],
    "dpo.data": ["  "],
    "dpo.beta": [0],
    "dpo.reduction": ["avg"],
    "dpo.strict": ["x"],
    "dpo.split_val": [1],
    "dpo.split_seed": [2**32],
    "dpo.max_new_tokens": [0],
    "dpo.temperature": [-1],
    "dpo.top_k": [0],
    "dpo.repeat_penalty": [0],
    "dpo.repeat_last_n": [-2],
    "classify.model": ["gguf"],
    "classify.data": ["", {"url": "inputs/x.csv", "bogus": 1}],
    "classify.format": ["xml"],
    "classify.member": [""],
    "classify.columns": [["text", ""], "text"],
    "classify.text_field": [""],
    "classify.label_field": [" "],
    "classify.balance": ["x"],
    "classify.split_train": [0, {"split_train": 0.9, "split_val": 0.1}],
    "classify.split_val": [1],
    "classify.split_seed": [-1],
    "classify.trainable": ["everything"],
    "judge.host": ["localhost:11434", "http://127.0.0.1:70000", "http://127.0.0.1:0"],
    "judge.model": [""],
    "judge.style": ["stars"],
    "judge.pairwise": ["x"],
    "judge.temperature": [-1],
    "judge.seed": [-1],
    "judge.num_ctx": [0],
    "judge.timeout_s": [0],
    "judge.retries": [-1],
    "judge.backoff_s": [-1],
    "judge.concurrency": [0],
    "judge.on_unavailable": ["ignore"],
    "judge.prompt_template": [""],
    "judge.pairwise_template": [" "],
    "judge.bootstrap_samples": [10],
    "export.model": ["gguf"],
    "export.opset": [17],
    "export.quantize_int8": ["x"],
    "export.parity_atol": [0],
    "export.parity_tokens": [0],
    "export.int8_min_agreement": [1.5],
    "export.formats": [[], ["onnx", "onnx"], ["safetensors"]],
    "export.gguf_types": [[], ["q4_0"]],
    "export.gguf_check_positions": [0],
    "export.gguf_check_timeout": [0, -1.5],
    "benchmark.tasks": [[], ["hella swag"], ["pipeline_cloze", "pipeline_cloze"], "pipeline_cloze", [3]],
    "benchmark.hub_copies": [
        "EleutherAI/lambada_openai",
        [{"repo": "a/b", "path": "x"}, {"repo": "a/b", "path": "y"}],
    ],
    "benchmark.hub_copies[].repo": [[{"repo": "lambada_openai", "path": "x"}]],
    "benchmark.hub_copies[].path": [[{"repo": "a/b", "path": ""}]],
    "benchmark.limit": [0, -5, 2.5],
    "benchmark.seed": [-1, 2**32],
}


def schema_keys(cls: type = Params, prefix: str = "") -> list[str]:
    """Every leaf key of the params schema. sft.data / dpo.data (a Source) are one value each; the fields of a list
    of sources are keys ``corpus.sources[].<field>``."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        items = typing.get_args(hint) if typing.get_origin(hint) is tuple else ()
        if dataclasses.is_dataclass(hint) and hint is not Source:
            keys += schema_keys(hint, f"{prefix}{f.name}.")
        elif items and dataclasses.is_dataclass(items[0]):  # the list itself, then each item's fields
            keys += [f"{prefix}{f.name}", *schema_keys(items[0], f"{prefix}{f.name}[].")]
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _named(key: str) -> str:
    """What the error line names for ``key``: the first list item; a source's location is the item itself."""
    return key.replace("[]", "[0]").removesuffix(".location")


def _override(key: str, value: object) -> dict:
    key = key.split("[]")[0]  # a list of sources: the example is the whole list
    *sections, name = key.split(".")
    node: dict = value if isinstance(value, dict) and "url" not in value else {name: value}
    for section in reversed(sections):
        node = {section: node}
    return node


@pytest.mark.parametrize("key", schema_keys())
def test_invalid_value_is_one_line_naming_the_key(key, tmp_path, capsys):
    examples = INVALID.get(key)
    assert examples, f"params key {key} has no invalid example in tests/unit/common/test_config.py: add one"
    stage = exit_on_error(load_params)
    for value in examples:
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(merge_params(tiny_params(), _override(key, value))))
        with pytest.raises(SystemExit) as exc:
            stage(path)
        err = capsys.readouterr().err
        assert exc.value.code == 1, (key, value)
        assert err.count("\n") == 1 and err.startswith(f"error: {path}: "), (key, value, err)
        assert _named(key) in err, (key, value, err)


@pytest.mark.parametrize("section", ["pretrain", "sft", "dpo", "classify"])
def test_muon_with_fsdp_is_one_line_naming_both_params(section, tmp_path, capsys):
    path = tmp_path / "params.yaml"
    override = {section: {"optimizer": "muon", "parallel": "fsdp"}}
    path.write_text(yaml.safe_dump(merge_params(tiny_params(), override)))
    with pytest.raises(SystemExit) as exc:
        exit_on_error(load_params)(path)
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.count("\n") == 1, err
    assert f"{section}.optimizer: muon" in err and f"{section}.parallel: fsdp" in err, err


@pytest.mark.parametrize("section", ["pretrain", "sft", "dpo", "classify"])
def test_keeping_the_best_step_with_fsdp_is_one_line_naming_both_params(section, tmp_path, capsys):
    path = tmp_path / "params.yaml"
    override = {section: {"optimizer": "adamw", "parallel": "fsdp", "keep": "best_loss"}}
    path.write_text(yaml.safe_dump(merge_params(tiny_params(), override)))
    with pytest.raises(SystemExit) as exc:
        exit_on_error(load_params)(path)
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.count("\n") == 1, err
    assert f"{section}.keep: best_loss" in err and f"{section}.parallel: fsdp" in err, err


def test_the_examples_name_only_real_keys():
    assert sorted(set(INVALID) - set(schema_keys())) == []


def test_the_baseline_of_the_examples_validates():
    assert parse_params(tiny_params()).pretrain.weight_decay >= 0


def test_shipped_params_validate():
    params = load_params(ROOT / "params.yaml")
    assert params.corpus.sources and params.evaluate.prompts


@pytest.mark.parametrize("profile", sorted(p.name for p in ROOT.glob("params-*.yaml")))
def test_shipped_profiles_validate_over_params(profile):
    args = set_param_args(
        ROOT / profile, ROOT / "params.yaml"
    )  # merges, validates, raises ConfigError if bad
    assert args and all(a == "-S" or "=" in a for a in args)


def test_architecture_options_reach_the_model_config():
    from pipeline.train.pretrain_setup import model_config

    model = parse_params(
        {
            "model": {
                "preset": "cpu-tiny",
                "pos_emb": "rope",
                "rope_base": 500,
                "norm": "rmsnorm",
                "mlp": "swiglu",
                "qk_norm": True,
            }
        }
    ).model
    cfg = model_config(model, 300)
    assert (cfg.pos_emb, cfg.rope_base, cfg.norm, cfg.mlp, cfg.qk_norm) == (
        "rope",
        500.0,
        "rmsnorm",
        "swiglu",
        True,
    )
    default = model_config(parse_params({"model": {"preset": "cpu-tiny"}}).model, 300)
    assert (default.pos_emb, default.norm, default.mlp, default.qk_norm) == (
        "learned",
        "layernorm",
        "gelu",
        False,
    )


@pytest.mark.parametrize("entry", [{"path": "x"}, {"repo": "a/b"}])
def test_a_hub_copy_without_repo_or_path_is_one_error(entry):
    with pytest.raises(ConfigError, match=r"benchmark.hub_copies: each entry needs repo and path"):
        parse_params({"benchmark": {"hub_copies": [entry]}})
