"""SFT and DPO: the objectives' arithmetic on tiny models, the real stages (resume after SIGKILL, bad input),
and a real `dvc repro dpo` in a throwaway project."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.common.config import TrainParams
from pipeline.common.hashing import sha256_file
from pipeline.data.instructions import Example, PreferencePair, tokenize_examples, tokenize_pairs
from pipeline.data.tokenizer import train_char
from pipeline.evaluation.answers import generate_responses
from pipeline.model.checkpoint import load_model, save_model
from pipeline.model.gpt import GPT, config_from_preset
from pipeline.model.sampling import SamplingOptions
from pipeline.train import resume
from pipeline.train.loop import train
from pipeline.train.losses import IGNORE_INDEX, dpo_loss, lm_loss
from pipeline.train.objectives import DPOObjective, EpochSampler, SFTObjective, reference_logprobs
from tests.helpers.finetune_project import fails as _fails
from tests.helpers.finetune_project import run_here as _run_here
from tests.helpers.finetune_project import stage_project as _stage_project
from tests.helpers.project import generated_instructions, make_project
from tests.helpers.train_worker import weights_digest

ROOT = Path(__file__).resolve().parents[3]
CONTEXT = 128
RESPONSE_KEYS = ["id", "instruction", "input", "output", "response"]


@pytest.fixture(scope="module")
def enc():
    return train_char([], 300)


def tiny_gpt(enc, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config_from_preset("cpu-tiny", vocab_size=enc.n_vocab, context_length=CONTEXT)).eval()


def sums(n: int, seed: int = 0, preferences: bool = False) -> list:
    records = generated_instructions(n, seed=seed, preferences=preferences)
    if preferences:
        return [
            PreferencePair(i, r["instruction"], "", r["chosen"], r["rejected"]) for i, r in enumerate(records)
        ]
    return [Example(i, r["instruction"], "", r["output"]) for i, r in enumerate(records)]


def sft_objective(data, mask_prompt=True, batch_size=4):
    return SFTObjective(
        data,
        data,
        batch_size=batch_size,
        grad_accum=1,
        eval_batches=2,
        context_length=CONTEXT,
        pad_id=0,
        mask_prompt=mask_prompt,
        seed=0,
    )


def dpo_objective(model, data, beta=0.1, reduction="sum", batch_size=4):
    ref = reference_logprobs(model, data, context_length=CONTEXT, pad_id=0, reduction=reduction, batch_size=3)
    return DPOObjective(
        data,
        data,
        ref,
        ref,
        beta=beta,
        reduction=reduction,
        batch_size=batch_size,
        grad_accum=1,
        eval_batches=8,
        context_length=CONTEXT,
        pad_id=0,
        seed=0,
    )


# ---------------------------------------------------------------------------------------------- SFT arithmetic


def test_sft_loss_ignores_masked_positions(enc):
    model = tiny_gpt(enc)
    data = tokenize_examples(enc, sums(4), "chat", CONTEXT)
    objective = sft_objective(data)
    batch = objective.train_batch(0, 0, 0, 1)
    targets = batch["targets"]
    masked = targets == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    loss, _ = objective.loss(model, batch)

    # Whatever the model predicts at a masked position (prompt or padding) changes neither the loss nor any gradient.
    logits, _ = model(batch["input_ids"])
    logits = logits.detach().requires_grad_(True)
    scrambled = torch.where(masked.unsqueeze(-1), torch.randn_like(logits) * 50, logits.detach())
    assert lm_loss(scrambled, targets).item() == pytest.approx(lm_loss(logits, targets).item(), abs=1e-6)
    lm_loss(logits, targets).backward()
    assert logits.grad[masked].abs().max().item() == 0.0
    # Changing the padding tokens in the inputs changes nothing either (they come after every real token).
    padded_inputs = batch["input_ids"].clone()
    lengths = (~masked).long().cumsum(1).argmax(1) + 1  # one past the last unmasked target
    for row, length in enumerate(lengths.tolist()):
        padded_inputs[row, length:] = 7
    repadded = objective.loss(model, {**batch, "input_ids": padded_inputs})[0]
    assert repadded.item() == pytest.approx(loss.item(), abs=1e-6)
    # The loss is the mean cross-entropy of the answer tokens alone, computed here by hand.
    logps = torch.log_softmax(model(batch["input_ids"])[0], dim=-1)
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert loss.item() == pytest.approx(-(picked[~masked]).mean().item(), abs=1e-5)
    # Without mask_prompt the prompt is trained on too: more targets, a different loss.
    unmasked = sft_objective(data, mask_prompt=False).train_batch(0, 0, 0, 1)["targets"]
    assert (unmasked != IGNORE_INDEX).sum() > (~masked).sum()


def test_epoch_sampler_is_deterministic_groups_lengths_and_visits_every_item_once_per_epoch():
    lengths = [(i * 37) % 101 for i in range(40)]
    sampler = EpochSampler(lengths, batch_size=4, grad_accum=1, seed=3, window=5)
    first_epoch = [sampler.indices(step, 0, 0, 1) for step in range(10)]
    assert sorted(i for batch in first_epoch for i in batch) == list(range(40))
    second_epoch = [sampler.indices(step, 0, 0, 1) for step in range(10, 20)]
    assert (
        sorted(i for batch in second_epoch for i in batch) == list(range(40)) and second_epoch != first_epoch
    )
    assert EpochSampler(lengths, 4, 1, seed=3, window=5).indices(13, 0, 0, 1) == sampler.indices(13, 0, 0, 1)
    ranks = [EpochSampler(lengths, 4, 1, 3).indices(1, 0, rank, 2) for rank in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    # Similar lengths share a batch: far less padding than random batches would need.
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in first_epoch)
    random_batches = [list(range(k, k + 4)) for k in range(0, 40, 4)]
    random_padding = sum(max(lengths[i] for i in b) * 4 - sum(lengths[i] for i in b) for b in random_batches)
    assert padding < random_padding / 2


# ---------------------------------------------------------------------------------------------- DPO arithmetic


def test_dpo_loss_is_log2_with_zero_margins_when_policy_is_reference(enc):
    loss, metrics = dpo_loss(*(torch.tensor([-3.0, -7.5]),) * 4, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    model = tiny_gpt(enc)
    objective = dpo_objective(
        copy.deepcopy(model), tokenize_pairs(enc, sums(6, preferences=True), "chat", CONTEXT)
    )
    loss, metrics = objective.loss(model, objective.train_batch(0, 0, 0, 1))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    # Zero up to float noise: the cached reference pass batches by length, the policy pass does not, so a margin
    # can be ±1e-7 and rewards/accuracies (the share of margins > 0) is that noise's sign at step 0.
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[name].item() == pytest.approx(0.0, abs=1e-5)
    assert metrics["logps/chosen"].item() < 0 and metrics["logps/rejected"].item() < 0


def _answer_logprob(model: GPT, prompt: list[int], answer: list[int]) -> float:
    """log p(answer | prompt), summed token by token on the unpadded sequence alone."""
    ids = torch.tensor([prompt + answer])
    logps = torch.log_softmax(model(ids[:, :-1])[0][0], dim=-1)
    return sum(logps[len(prompt) - 1 + j, token].item() for j, token in enumerate(answer))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_response_only_logprobs_exclude_prompt_and_padding(enc, reduction):
    model = tiny_gpt(enc)
    pairs = [
        PreferencePair(0, "Say yes.", "", "Yes.", "No, and a much longer answer that pads the others."),
        PreferencePair(1, "A far longer prompt than the first one has.", "", "Sure thing.", "Nope."),
    ]
    data = tokenize_pairs(enc, pairs, "chat", CONTEXT)
    objective = dpo_objective(model, data, reduction=reduction, batch_size=2)
    logps = objective.policy_logprobs(model, objective.train_batch(0, 0, 0, 1)).tolist()
    order = objective.sampler.indices(0, 0, 0, 1)
    assert sorted(order) == [0, 1]
    for k, i in enumerate(order):  # rows: chosen answers first, then the rejected ones, padded to one width
        for which, row in ((0, k), (1, 2 + k)):
            answer = data.responses[i][which]
            expected = _answer_logprob(model, data.prompts[i], answer)
            expected /= len(answer) if reduction == "mean" else 1
            assert logps[row] == pytest.approx(expected, abs=1e-4)


@pytest.mark.integration  # trains
def test_a_few_dpo_steps_raise_accuracies_and_margins_on_the_training_pairs(enc, tmp_path):
    data = tokenize_pairs(enc, sums(16, seed=2, preferences=True), "chat", CONTEXT)
    reference = tiny_gpt(enc)
    policy = copy.deepcopy(reference)
    objective = dpo_objective(reference, data, beta=0.5, batch_size=8)
    before = _mean_metrics(objective, policy)
    params = TrainParams(
        batch_size=8,
        max_steps=12,
        lr=3e-3,
        warmup_steps=2,
        eval_every=12,
        eval_batches=2,
        checkpoint_every=12,
        log_every=4,
        dtype="fp32",
        seed=1,
    )
    result = train(
        policy,
        objective,
        params,
        checkpoint_dir=tmp_path / "ckpt",
        report_dir=tmp_path / "report",
        desc="dpo-test",
    )
    after = _mean_metrics(objective, result.model)
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-5) and before["rewards/accuracies"] == 0.0
    assert after["rewards/accuracies"] >= 0.75
    assert after["rewards/margins"] > 0.5
    assert after["loss"] < math.log(2)
    logged = json.loads((tmp_path / "report" / "metrics.json").read_text())
    for split in ("train", "val"):
        assert set(logged[split]["rewards"]) == {"chosen", "rejected", "margins", "accuracies"}
        assert set(logged[split]["logps"]) == {"chosen", "rejected"}


@torch.no_grad()
def _mean_metrics(objective: DPOObjective, model: GPT) -> dict[str, float]:
    rows = [objective.loss(model, batch) for batch in objective.eval_batches()]
    names = ["loss", *rows[0][1]]
    return {n: sum(float(loss if n == "loss" else m[n]) for loss, m in rows) / len(rows) for n in names}


# ---------------------------------------------------------------------------------------------- held-out answers


def test_batched_responses_equal_one_by_one_and_keep_the_order(enc):
    model = tiny_gpt(enc, seed=4)
    examples = sums(7, seed=5)
    opts = SamplingOptions(max_new_tokens=12, temperature=0.0, eos_id=enc.eot_token)
    batched = generate_responses(model, enc, examples, "chat", opts, batch_size=8)
    single = generate_responses(model, enc, examples, "chat", opts, batch_size=1)
    assert batched.records == single.records
    assert [r["id"] for r in batched.records] == [e.id for e in examples]
    assert all(list(r) == RESPONSE_KEYS for r in batched.records)
    assert batched.records[0]["output"] == examples[0].output
    # A prompt longer than the context is cut from the left, keeping the end that asks for the answer.
    long = Example(9, "word " * 200, "", "x")
    cut = generate_responses(model, enc, [long], "chat", opts, batch_size=1)
    assert cut.prompts_cut == 1 and isinstance(cut.records[0]["response"], str)


# ---------------------------------------------------------------------------------------------- the stages


def _stage(name: str, cwd: Path, kill_after: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if kill_after is not None:
        env[resume.KILL_AFTER_CHECKPOINT] = str(kill_after)
    return subprocess.Popen(
        [sys.executable, "-m", f"stages.{name}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_after_first_checkpoint(name: str, cwd: Path) -> None:
    proc = _stage(name, cwd, kill_after=3)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, "the stage must die right after its first checkpoint"
    steps = [int(p.name.split("_")[1]) for p in resume.list_checkpoints(cwd / "checkpoints" / name)]
    assert steps == [3], "killed right after checkpoint 3, so it is the only one"
    assert not (cwd / "models" / name).exists()


def _digest(model_dir: Path) -> str:
    return weights_digest(load_model(model_dir)[0])


def _responses(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.integration  # the sft and dpo stages, killed and resumed
def test_sft_and_dpo_stages_resume_after_sigkill_to_the_same_weights(tmp_path, monkeypatch, caplog):
    straight = _stage_project(tmp_path / "straight")
    _run_here("sft", straight, monkeypatch)
    _run_here("dpo", straight, monkeypatch)
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed, ignore=shutil.ignore_patterns("checkpoints", "models", "reports"))
    shutil.copytree(straight / "models" / "base", killed / "models" / "base")
    for name in ("sft", "dpo"):
        _kill_after_first_checkpoint(name, killed)
        caplog.clear()
        _run_here(name, killed, monkeypatch)
        assert any("resuming from" in r.message for r in caplog.records)
        assert _digest(killed / "models" / name) == _digest(straight / "models" / name)

    sft = _responses(straight / "reports/sft/responses.jsonl")
    dpo = _responses(straight / "reports/dpo/responses.jsonl")
    assert [r["id"] for r in sft] == [r["id"] for r in dpo] and len(sft) == 4  # 10% of 40
    assert all(list(r) == RESPONSE_KEYS for r in sft + dpo)
    metrics = json.loads((straight / "reports/dpo/metrics.json").read_text())
    for split in ("train", "val"):
        assert set(metrics[split]["rewards"]) == {"chosen", "rejected", "margins", "accuracies"}
        assert "loss" in metrics[split] and set(metrics[split]["logps"]) == {"chosen", "rejected"}
    assert metrics["data"]["held_out_excluded"] == 4  # the SFT test prompts never reach DPO training
    assert json.loads((straight / "reports/sft/metrics.json").read_text())["data"]["test"] == 4
    assert (straight / "reports/sft/plots/metrics/train/loss.tsv").is_file()


def test_base_model_with_another_tokenizer_is_refused(tmp_path, monkeypatch, capsys):
    project = _stage_project(tmp_path)
    config = project / "models/base/config.json"
    meta = json.loads(config.read_text())
    meta["tokenizer"]["fingerprint"] = "0" * 64
    config.write_text(json.dumps(meta))
    assert "models/base/config.json: model was trained with tokenizer 000000000000" in _fails(
        "sft", project, monkeypatch, capsys
    )


def test_malformed_record_fails_when_strict_and_is_counted_otherwise(tmp_path, monkeypatch, capsys):
    project = _stage_project(tmp_path, {"sft": {"strict": True}})
    raw = project / "data/raw/sft.json"
    records = json.loads(raw.read_text())
    del records[7]["output"]
    raw.write_text(json.dumps(records))
    assert "sft.json: record 7: field 'output' is missing (strict: true)" in _fails(
        "sft", project, monkeypatch, capsys
    )


def test_empty_sft_data_is_refused(tmp_path, monkeypatch, capsys):
    project = _stage_project(tmp_path)
    (project / "data/raw/sft.json").write_text("[]")
    assert "data/raw/sft.json: empty dataset" in _fails("sft", project, monkeypatch, capsys)


def _fake_sft_model(project: Path, recipe: bool = True) -> None:
    """models/sft as the sft stage leaves it (the base weights stand in for tuned ones)."""
    model, meta = load_model(project / "models/base")
    extra = {}
    if recipe:
        extra["instructions"] = {
            "data": "data/raw/sft.json",
            "data_sha256": sha256_file(project / "data/raw/sft.json"),
            "template": "chat",
            "strict": False,
            "split_train": 0.85,
            "split_val": 0.05,
            "split_seed": 123,
        }
    save_model(project / "models/sft", model, tokenizer=meta["tokenizer"], **extra)


def test_dpo_refuses_pairs_that_teach_nothing_and_a_model_not_from_sft(tmp_path, monkeypatch, capsys):
    project = _stage_project(tmp_path)
    _fake_sft_model(project)
    same = [{"instruction": f"Q{i}", "chosen": "Same.", "rejected": "Same. "} for i in range(5)]
    (project / "data/raw/dpo.json").write_text(json.dumps(same))
    err = _fails("dpo", project, monkeypatch, capsys)
    assert "dpo.json: no valid records (5 skipped; first:" in err and "identical to 'chosen'" in err
    shutil.rmtree(project / "models/sft")
    _fake_sft_model(project, recipe=False)
    assert "models/sft/config.json: no 'instructions' record" in _fails("dpo", project, monkeypatch, capsys)
    _fake_sft_model(project)
    (project / "data/raw/sft.json").write_text(
        json.dumps([{"instruction": "Changed.", "output": "Yes."}] * 9)
    )
    assert "data/raw/sft.json: missing or changed since models/sft was trained" in _fails(
        "dpo", project, monkeypatch, capsys
    )


@pytest.mark.integration  # dvc repro
def test_dvc_repro_dpo_in_a_temp_project(tmp_path):
    project = make_project(tmp_path / "project")
    # Stages run as `python -m stages.<name>`: the venv's python must come first on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    dvc = [sys.executable, "-m", "dvc"]
    done = subprocess.run([*dvc, "repro", "dpo"], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    sft = _responses(project / "reports/sft/responses.jsonl")
    dpo = _responses(project / "reports/dpo/responses.jsonl")
    assert sft and [r["id"] for r in sft] == [r["id"] for r in dpo]
    assert all(list(r) == RESPONSE_KEYS and isinstance(r["response"], str) for r in dpo)
    shown = json.loads(
        subprocess.run(
            [*dvc, "metrics", "show", "--json"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    dpo_metrics = next(v for k, v in shown[""]["data"].items() if k.endswith("reports/dpo/metrics.json"))[
        "data"
    ]
    assert "accuracies" in dpo_metrics["train"]["rewards"] and "margins" in dpo_metrics["val"]["rewards"]
    again = subprocess.run([*dvc, "repro", "dpo"], cwd=project, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "didn't change" in again.stdout  # nothing reruns
