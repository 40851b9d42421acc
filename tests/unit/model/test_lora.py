"""LoRA: adapters start at the base, only they train, merge and disable are exact, checkpoints resume bit for bit."""

from __future__ import annotations

import json
import math
import signal
from dataclasses import replace

import pytest
import torch

from pipeline.common.config import ConfigError, LoRAParams, TrainParams, parse_params
from pipeline.common.errors import PipelineError
from pipeline.model import lora
from pipeline.model.checkpoint import ADAPTER, WEIGHTS, load_model, save_model, save_trained
from pipeline.model.gpt import GPT, config_from_preset
from pipeline.train import resume
from pipeline.train.loop import make_optimizer
from tests.helpers.train_worker import finish as _finish
from tests.helpers.train_worker import start as _worker
from tests.helpers.train_worker import tiny_model, weights_digest

RANK8 = LoRAParams(rank=8, alpha=16.0)


def _model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(config_from_preset("cpu-tiny", vocab_size=64, context_length=32, **overrides)).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _perturb_adapters(model: GPT) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))


def test_adapters_start_at_the_base_and_only_they_are_trainable_and_optimised():
    model = _model()
    base_logits = model(_ids())[0]
    lora.apply_lora(model, RANK8, "sft.lora", seed=3)
    assert torch.equal(model(_ids())[0], base_logits)  # B = 0: the adapted model is the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora.A", "lora.B")) for n in trainable)
    assert len(trainable) == 2 * 4 * model.cfg.n_layer  # qkv, out_proj, fc, proj per block
    optimised = [
        p
        for group in make_optimizer(model, TrainParams(), torch.device("cpu")).param_groups
        for p in group["params"]
    ]
    assert {id(p) for p in optimised} == {id(p) for n, p in model.named_parameters() if n in trainable}
    n_trainable, n_all = lora.trainable_summary(model)
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert 0 < n_trainable / n_all < 0.5


def test_merge_equals_the_adapted_forward_and_disabled_equals_the_base():
    model = _model()
    base_logits = model(_ids())[0]
    lora.apply_lora(model, replace(RANK8, targets=("attention", "mlp")), "sft.lora", seed=3)
    _perturb_adapters(model)
    adapted = model(_ids())[0]
    assert not torch.allclose(adapted, base_logits)
    with lora.disabled(model):
        assert torch.equal(model(_ids())[0], base_logits)
    merged = lora.merge(model)
    assert lora.adapter_info(merged) is None
    assert not any(isinstance(m, lora.LinearWithLoRA) for m in merged.modules())
    torch.testing.assert_close(merged(_ids())[0], adapted, atol=1e-5, rtol=1e-5)


def test_same_seed_same_adapters():
    a = lora.apply_lora(_model(), RANK8, "sft.lora", seed=3)
    b = lora.apply_lora(_model(), RANK8, "sft.lora", seed=3)
    assert weights_digest(a) == weights_digest(b)


@pytest.mark.parametrize(
    "params, message",
    [
        (replace(RANK8, targets=("attention", "nope")), "sft.lora.targets: 'nope' matches no linear layer"),
        (replace(RANK8, rank=80), "sft.lora.rank 80 exceeds the size of layer blocks.0.att.qkv (64 → 192)"),
        (replace(RANK8, targets=("head",)), "sft.lora.targets: the head is tied to the token embedding"),
    ],
)
def test_bad_lora_settings_are_one_line_errors(params, message):
    with pytest.raises(PipelineError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        lora.apply_lora(_model(), params, "sft.lora", seed=0)


def test_lora_on_an_untied_head_trains_and_merges():
    model = _model(tie_weights=False)
    lora.apply_lora(model, replace(RANK8, targets=("head",)), "sft.lora", seed=0)
    assert lora.adapter_info(model).layers == ["out_head"]
    _perturb_adapters(model)
    adapted = model(_ids())[0]
    torch.testing.assert_close(lora.merge(model)(_ids())[0], adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "section, value, message",
    [
        ("pretrain", {"rank": 4}, "pretrain.lora.rank must be 0: LoRA needs trained weights"),
        ("sft", {"rank": -1}, "sft.lora.rank must be >= 0"),
        ("dpo", {"rank": 4, "alpha": 0}, "dpo.lora.alpha must be > 0"),
        ("sft", {"rank": 4, "targets": []}, "sft.lora.targets must be a non-empty list"),
        ("sft", {"rank": 4, "ranks": 3}, "unknown key 'sft.lora.ranks'"),
    ],
)
def test_bad_lora_params_name_the_key(section, value, message):
    with pytest.raises(ConfigError, match=f"^params.yaml: {message}"):
        parse_params({section: {"lora": value}})


def test_unmerged_adapter_directory_loads_as_the_merged_model_and_refuses_a_changed_base(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    base = _model()
    save_model("models/base", base)
    adapted = lora.apply_lora(load_model("models/base")[0], replace(RANK8, merge=False), "sft.lora", seed=0)
    _perturb_adapters(adapted)
    expected = adapted(_ids())[0]
    save_trained("models/sft", adapted, base="models/base", stage="sft")
    assert (tmp_path / "models/sft" / ADAPTER).is_file() and not (tmp_path / "models/sft" / WEIGHTS).exists()
    adapter_bytes = (tmp_path / "models/sft" / ADAPTER).stat().st_size
    assert adapter_bytes < (tmp_path / "models/base" / WEIGHTS).stat().st_size / 3
    loaded, meta = load_model("models/sft")
    assert meta["adapter"]["base"] == "models/base" and meta["stage"] == "sft"
    torch.testing.assert_close(loaded(_ids())[0], expected, atol=1e-5, rtol=1e-5)

    save_model("models/base", _model(seed=1))  # the base was retrained: the adapter no longer applies
    with pytest.raises(PipelineError, match="adapter was trained on base weights .* but its base is now"):
        load_model("models/sft")


def test_merged_result_is_a_plain_model_directory(tmp_path):
    adapted = lora.apply_lora(_model(), RANK8, "sft.lora", seed=0)
    _perturb_adapters(adapted)
    expected = adapted(_ids())[0]
    merged = save_trained(tmp_path / "sft", adapted, base="models/base")
    assert (tmp_path / "sft" / WEIGHTS).is_file() and lora.adapter_info(merged) is None
    torch.testing.assert_close(load_model(tmp_path / "sft")[0](_ids())[0], expected, atol=1e-5, rtol=1e-5)


LORA_PARAMS = TrainParams(
    batch_size=8,
    max_steps=24,
    warmup_steps=4,
    lr=1e-2,
    eval_every=12,
    eval_batches=2,
    checkpoint_every=6,
    keep_checkpoints=2,
    log_every=3,
    seed=5,
    lora=replace(RANK8, rank=4),
    dtype="fp32",  # "auto" times the dtypes in each process: two runs timed at once under load may choose apart
)


@pytest.mark.integration  # training processes, killed and resumed
def test_sigkilled_lora_run_resumes_to_the_same_merged_weights(tmp_path):
    straight = _worker(tmp_path / "straight", LORA_PARAMS)
    killed = _worker(tmp_path / "killed", LORA_PARAMS, kill_after=LORA_PARAMS.checkpoint_every)
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = resume.list_checkpoints(tmp_path / "killed" / "checkpoints")
    assert [p.name for p in checkpoints] == ["step_00000006"]
    # The checkpoint holds the adapters and the base's fingerprint, not the model.
    assert (checkpoints[0] / "adapter" / ADAPTER).is_file() and not (checkpoints[0] / "model").exists()
    assert len(resume.read_state(checkpoints[0])["files"]) == 3

    _finish(straight)
    resumed = _worker(tmp_path / "killed", LORA_PARAMS)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in err and "training 8,192 of" in err
    merged = (tmp_path / "killed" / "digest_rank0.txt").read_text()
    assert merged == (tmp_path / "straight" / "digest_rank0.txt").read_text()
    assert merged != weights_digest(tiny_model())  # the adapters learned something, and it was merged in
    metrics = (tmp_path / "killed" / "metrics.json").read_text()
    assert '"summary/trainable_params": 8192.0' in metrics


def test_adapter_checkpoint_of_another_base_is_refused(tmp_path):
    model = lora.apply_lora(_model(), RANK8, "sft.lora", seed=0)
    path = resume.save_checkpoint(tmp_path, 6, model, {"x": torch.zeros(1)}, {"run_key": "k"})
    other = lora.apply_lora(_model(seed=1), RANK8, "sft.lora", seed=0)
    with pytest.raises(resume.CorruptCheckpoint, match="adapter trained on base"):
        resume.load_checkpoint(path, other, resume.read_state(path))
    assert resume.load_checkpoint(path, model, resume.read_state(path)).trainer["x"].shape == (1,)


@pytest.mark.integration  # the sft and dpo stages
def test_sft_and_dpo_stages_with_lora_merge_or_keep_an_adapter(tmp_path, monkeypatch, caplog):
    from tests.helpers.finetune_project import run_here as _run_here
    from tests.helpers.finetune_project import stage_project as _stage_project

    project = _stage_project(
        tmp_path, {"sft": {"lora": {"rank": 8}}, "dpo": {"lora": {"rank": 4, "merge": False}}}
    )
    base, _ = load_model(project / "models/base")
    with caplog.at_level("WARNING"):
        _run_here("sft", project, monkeypatch)
        _run_here("dpo", project, monkeypatch)
    announced = [r.getMessage() for r in caplog.records if "parameters (" in r.getMessage()]
    assert announced[0].startswith("sft: training 16,384 of ") and announced[1].startswith(
        "dpo: training 8,192 of "
    )
    sft_metrics = json.loads((project / "reports/sft/metrics.json").read_text())
    assert (
        sft_metrics["summary"]["trainable_params"] == 16384
        and sft_metrics["summary"]["trainable_share"] < 0.2
    )
    # sft merged: a plain model directory that differs from the base only where adapters were.
    sft, meta = load_model(project / "models/sft")
    assert (project / "models/sft" / WEIGHTS).is_file() and "adapter" not in meta
    changed = {n for n, t in sft.state_dict().items() if not torch.equal(t, base.state_dict()[n])}
    assert changed and all(
        n.endswith(("att.qkv.weight", "att.out_proj.weight", "ff.fc.weight", "ff.proj.weight"))
        for n in changed
    )
    # dpo kept its adapter on top of models/sft; loading applies it, and the held-out answers were written.
    dpo_meta = json.loads((project / "models/dpo/config.json").read_text())
    assert dpo_meta["adapter"]["base"] == "models/sft" and not (project / "models/dpo" / WEIGHTS).exists()
    dpo, _ = load_model(project / "models/dpo")
    assert any(not torch.equal(t, sft.state_dict()[n]) for n, t in dpo.state_dict().items())
    assert len((project / "reports/dpo/responses.jsonl").read_text().splitlines()) == 4
    dpo_metrics = json.loads((project / "reports/dpo/metrics.json").read_text())
    assert math.isfinite(dpo_metrics["train"]["rewards"]["margins"])  # against the reference = adapters off
    from pipeline.serve.served_model import load_model_dir

    served = load_model_dir("dpo:latest", "models/dpo")  # the server loads the adapter directory too
    assert served.context_length == dpo.cfg.context_length and served.template == "chat"


def test_sft_stage_with_a_target_matching_no_layer_fails_with_one_line(tmp_path, monkeypatch, capsys):
    from tests.helpers.finetune_project import fails as _fails
    from tests.helpers.finetune_project import stage_project as _stage_project

    project = _stage_project(tmp_path, {"sft": {"lora": {"rank": 8, "targets": ["attn"]}}})
    err = _fails("sft", project, monkeypatch, capsys)
    assert err.startswith("error: sft.lora.targets: 'attn' matches no linear layer of the model")
