"""The book's chapter 5 regime: pretrain.sampling: epochs (strided windows, reshuffled each epoch, exact on resume),
pretrain.epochs, and model.init: pytorch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.common.config import ConfigError, ModelParams, PretrainParams, load_params, parse_params
from pipeline.common.errors import PipelineError
from pipeline.common.profile import set_param_args
from pipeline.data.shards import ShardDataset
from pipeline.data.tokenizer import train_tokenizer
from pipeline.train.pretrain_setup import prepare
from tests.helpers.workspace import tokenize_corpus

MODEL = ModelParams(preset="cpu-tiny", context_length=32, tie_weights=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus_text) -> Path:
    root = tmp_path_factory.mktemp("epochs")
    tokenize_corpus(
        root, corpus_text[:20_000], train_tokenizer("bpe", [corpus_text[:20_000]], 300), "bpe", 0.9
    )
    return root


def setup(data: Path, model: ModelParams = MODEL, **pretrain):
    params = PretrainParams(
        **{"batch_size": 2, "seed": 123, "eval_batches": 1, "sampling": "epochs", **pretrain}
    )
    return prepare(model, params, 123, data / "data/tokenizer", data / "data/shards")


def test_each_epoch_is_a_seeded_shuffle_of_every_strided_window_once(data):
    objective = setup(data).objective
    train = ShardDataset(data / "data/shards", "train")
    n_windows = len(
        range(0, train.num_tokens - 32, 32)
    )  # the book's GPTDatasetV1: range(0, len - max_length, stride)
    per_epoch = objective.batches_per_epoch
    assert per_epoch == n_windows // 2  # the last partial batch is dropped, as the book's drop_last=True
    firsts = []
    for epoch in range(2):
        seen = [
            tuple(objective.train_batch(epoch * per_epoch + k, 0, 0, 1)["input_ids"][:, 0].tolist())
            for k in range(per_epoch)
        ]
        starts = [
            objective.train_batch(epoch * per_epoch + k, 0, 0, 1)["input_ids"] for k in range(per_epoch)
        ]
        windows = {tuple(row.tolist()) for batch in starts for row in batch}
        assert len(windows) == 2 * per_epoch  # no window twice within an epoch
        firsts.append(seen)
    assert firsts[0] != firsts[1]  # reshuffled each epoch
    # Targets are the inputs shifted by one; windows do not overlap (stride = context).
    batch = objective.train_batch(0, 0, 0, 1)
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])


def test_batches_are_a_pure_function_of_the_step_so_resume_is_exact(data):
    first = setup(data).objective
    in_order = [first.train_batch(step, 0, 0, 1)["input_ids"] for step in range(3 * first.batches_per_epoch)]
    resumed = setup(data).objective  # a fresh process after a restart, asked from a later step on
    for step in (2 * first.batches_per_epoch + 1, 5, 0):
        assert torch.equal(resumed.train_batch(step, 0, 0, 1)["input_ids"], in_order[step])


def test_stride_and_epochs_set_the_windows_and_the_steps(data):
    half = setup(data, stride=16, epochs=3)
    full = setup(data, epochs=3)
    tokens = ShardDataset(data / "data/shards", "train").num_tokens
    assert half.objective.batches_per_epoch == len(range(0, tokens - 32, 16)) // 2
    assert half.params.max_steps == 3 * half.objective.batches_per_epoch
    assert setup(data, epochs=3, grad_accum=2).params.max_steps == -(
        -3 * full.objective.batches_per_epoch // 2
    )


@torch.no_grad()
def test_pytorch_init_is_each_layers_default(data):
    book = setup(
        data, model=ModelParams(preset="cpu-tiny", context_length=32, tie_weights=False, init="pytorch")
    ).model
    gpt2 = setup(data).model
    assert (
        0.9 < float(book.tok_emb.weight.std()) < 1.1 and float(gpt2.tok_emb.weight.std()) < 0.03
    )  # N(0, 1) vs N(0, .02)
    bound = 1 / book.cfg.n_embd**0.5  # Kaiming-uniform(a=√5) on a Linear: U(-1/√fan_in, 1/√fan_in)
    assert (
        float(book.blocks[0].ff.fc.weight.abs().max()) <= bound
        and float(book.blocks[0].ff.fc.bias.abs().sum()) > 0
    )
    assert float(gpt2.blocks[0].ff.fc.bias.abs().sum()) == 0


def test_bad_regimes_are_one_line(data):
    with pytest.raises(
        ConfigError, match=r"pretrain.stride and pretrain.epochs need pretrain.sampling: epochs"
    ):
        parse_params({"pretrain": {"stride": 128}})
    with pytest.raises(ConfigError, match=r"pretrain.epochs must be > 0, got 0"):
        parse_params({"pretrain": {"sampling": "epochs", "epochs": 0}})
    with pytest.raises(
        PipelineError, match=r"model.init=pytorch initialises a model from scratch; model.init_from=gpt2"
    ):
        prepare(
            ModelParams(init_from="gpt2", init="pytorch"),
            PretrainParams(),
            1,
            data / "data/tokenizer",
            data / "data/shards",
        )
    with pytest.raises(
        PipelineError, match=r"2 train windows \(stride 10000\) make no full batch of pretrain.batch_size=3"
    ):
        setup(data, batch_size=3, stride=10_000)


@pytest.mark.integration  # dvc
def test_chapter5_profile_round_trips_through_dvc_set_param(tmp_path):
    """The profile's -S arguments, applied by DVC's own override code, give the profile's params (the corpus source
    mapping included, which needs the override grammar rather than YAML)."""
    from dvc.utils.hydra import apply_overrides

    root = Path(__file__).resolve().parents[3]
    args = set_param_args(root / "params-book-ch5.yaml", root / "params.yaml")
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(str(tmp_path / "params.yaml"), args[1::2])
    params = load_params(tmp_path / "params.yaml")
    verdict = params.corpus.sources[0]
    assert verdict.location.endswith(
        "ch02/01_main-chapter-code/the-verdict.txt"
    ) and verdict.sha256.startswith("b41e41a6")
    assert (
        params.model.init == "pytorch" and not params.model.tie_weights and params.model.context_length == 256
    )
    assert (params.pretrain.sampling, params.pretrain.stride, params.pretrain.epochs) == ("epochs", 256, 10)
    assert (params.pretrain.lr, params.pretrain.batch_size, params.pretrain.weight_decay) == (0.0004, 2, 0.1)


@pytest.mark.integration  # the pretrain stage's process
def test_pretrain_stage_trains_the_given_epochs(data):
    params = {
        "seed": 123,
        "model": {"preset": "cpu-tiny", "context_length": 32, "tie_weights": False, "init": "pytorch"},
        "pretrain": {
            "sampling": "epochs",
            "epochs": 2,
            "batch_size": 64,
            "warmup_steps": 0,
            "eval_every": 100,
            "eval_batches": 1,
            "checkpoint_every": 100,
            "log_every": 5,
            "dtype": "fp32",
        },
    }
    (data / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run(
        [sys.executable, "-m", "stages.pretrain"],
        cwd=data,
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    per_epoch = setup(data, batch_size=64).objective.batches_per_epoch
    meta = json.loads((data / "models/base/config.json").read_text())
    assert meta["training"]["steps"] == 2 * per_epoch and not meta["model"]["tie_weights"]


def test_mid_training_steps_read_the_instruction_examples_in_their_template(data):
    from pipeline.data.instructions import Example
    from pipeline.data.tokenizer import load_tokenizer

    examples = [Example(id=i, instruction=f"Name a colour {i}.", input="", output="Red.") for i in range(8)]
    mid = prepare(
        MODEL,
        PretrainParams(batch_size=2, seed=123, eval_batches=1, max_steps=6, mid_steps=2),
        123,
        data / "data/tokenizer",
        data / "data/shards",
        mid=examples,
        template="alpaca",
    ).objective
    plain = setup(data, sampling="random", max_steps=6).objective
    enc = load_tokenizer(data / "data/tokenizer")
    assert mid.mid_from == 4
    for step in range(4):  # before mid-training: the corpus windows, as without it
        assert torch.equal(
            mid.train_batch(step, 0, 0, 1)["input_ids"], plain.train_batch(step, 0, 0, 1)["input_ids"]
        )
    batch = mid.train_batch(4, 0, 0, 1)
    stream = mid.mid.tolist()
    assert "### Response:\nRed.<|endoftext|>" in enc.decode(stream)  # the alpaca template, the answer, EOT
    row = batch["input_ids"][0].tolist()
    assert any(stream[i : i + len(row)] == row for i in range(len(stream)))  # a window of that text
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    assert torch.equal(
        batch["input_ids"], mid.train_batch(4, 0, 0, 1)["input_ids"]
    )  # seeded: a pure function
    with pytest.raises(PipelineError, match="mid-training"):  # no examples: nothing to mid-train on
        prepare(
            MODEL,
            PretrainParams(batch_size=2, seed=123, eval_batches=1, max_steps=6, mid_steps=2),
            123,
            data / "data/tokenizer",
            data / "data/shards",
        )
