"""pretrain + evaluate as real DVC stages in a throwaway project: repro, no-op, experiments, bad input, torchrun."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.project import make_project, run

DVC = [sys.executable, "-m", "dvc"]
# Stages run as `python -m stages.<name>`: the venv's python must come first on PATH.
ENV = {
    **os.environ,
    "TQDM_DISABLE": "1",
    "DVC_NO_ANALYTICS": "1",
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
}


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("pretrain") / "project")
    _run([*DVC, "repro", "evaluate"], root)
    return root


def test_repro_evaluate_writes_models_metrics_plots_and_report(project):
    meta = json.loads((project / "models/base/config.json").read_text())
    assert meta["tokenizer"]["path"] == "data/tokenizer" and len(meta["tokenizer"]["fingerprint"]) >= 16
    assert meta["model"]["vocab_size"] == 512  # the tokenizer's, not the preset's
    train_rows = (project / "reports/pretrain/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert train_rows[0] == "step\tloss" and len(train_rows) == 1 + 6  # log_every=1, max_steps=6
    assert (project / "reports/pretrain/plots/metrics/val/loss.tsv").is_file()
    metrics = json.loads((project / "reports/evaluate/metrics.json").read_text())
    for key in (
        "val_loss",
        "perplexity",
        "bits_per_byte",
        "unigram_loss",
        "unigram_bits_per_byte",
        "accuracy",
    ):
        assert metrics[key] > 0, key
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["val_loss"], rel=1e-6)
    assert 0.5 < metrics["text_bytes"] / metrics["tokens"] < 8  # a byte-level BPE: a few bytes per token
    # bits per byte = nats per token / ln 2 / bytes per token (special tokens, which are not text, aside).
    per_byte = metrics["val_loss"] / 0.6931471805599453 / (metrics["text_bytes"] / metrics["tokens"])
    assert metrics["bits_per_byte"] == pytest.approx(per_byte, rel=0.05)
    assert metrics["loss_below_unigram"] == pytest.approx(metrics["unigram_loss"] - metrics["val_loss"])
    samples = json.loads((project / "reports/evaluate/samples.json").read_text())
    assert [s["prompt"] for s in samples] == ["En un lugar"] and samples[0]["tokens"] > 0
    assert (project / "reports/evaluate/loss.png").read_bytes()[:4] == b"\x89PNG"
    report = (project / "reports/evaluate/report.md").read_text()
    assert "bits per byte" in report and "unigram baseline" in report and "En un lugar" in report


def test_second_repro_is_a_no_op_and_samples_are_reproducible(project):
    before = (project / "reports/evaluate/samples.json").read_text()
    done = _run([*DVC, "repro", "evaluate"], project)
    assert "didn't change, skipping" in done.stdout and "Running stage" not in done.stdout
    _run([sys.executable, "-m", "stages.evaluate"], project)
    assert (project / "reports/evaluate/samples.json").read_text() == before


def test_experiment_with_another_lr_is_listed_with_metrics(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "baseline run"], project)
    done = _run([*DVC, "exp", "run", "-S", "pretrain.lr=0.003", "evaluate"], project)
    assert "Running stage 'pretrain'" in done.stdout  # checkpoints of the lr=0.001 run are not resumed
    shown = json.loads(_run([*DVC, "exp", "show", "--json"], project).stdout)
    baseline = next(entry for entry in shown if entry.get("name") == "main")
    experiments = [rev["data"] for exp in baseline.get("experiments") or [] for rev in exp["revs"]]
    runs = [baseline["data"], *experiments]
    assert [r["params"]["params.yaml"]["data"]["pretrain"]["lr"] for r in runs] == [0.001, 0.003]
    for r in runs:
        assert r["metrics"]["reports/evaluate/metrics.json"]["data"]["val_loss"] > 0
        assert r["metrics"]["reports/pretrain/metrics.json"]["data"]["val"]["loss"] > 0


def _copy(project: Path, dest: Path) -> Path:
    """A working copy with the built data, for a stage run that must not disturb the DVC project."""
    for name in ("pipeline", "stages", "params.yaml", "data/tokenizer", "data/shards", "checkpoints"):
        src = project / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def _edit_params(root: Path, section: str, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _corrupt_manifest_fingerprint(root: Path) -> None:
    manifest = json.loads((root / "data/shards/manifest.json").read_text())
    manifest["tokenizer_fingerprint"] = "0" * 64
    (root / "data/shards/manifest.json").write_text(json.dumps(manifest))


def _corrupt_checkpoints(root: Path) -> None:
    for state in (root / "checkpoints/pretrain").glob("step_*/state.json"):
        state.write_text("{truncated")


BAD_INPUT = {
    "unknown_preset": (
        lambda r: _edit_params(r, "model", preset="gpt-9000"),
        r"unknown model preset 'gpt-9000'",
    ),
    "n_head": (
        lambda r: _edit_params(r, "model", n_head=5),
        r"model.n_head=5 does not divide model.n_embd=64",
    ),
    "context": (
        lambda r: _edit_params(r, "pretrain", context_length=128),
        r"pretrain.context_length=128 is longer",
    ),
    "batch": (lambda r: _edit_params(r, "pretrain", batch_size=4000), r"fewer than one batch"),
    "tokenizer_mismatch": (_corrupt_manifest_fingerprint, r"shards were written with tokenizer"),
    "corrupt_checkpoint": (_corrupt_checkpoints, r"no usable checkpoint .*state\.json"),
}


def test_bad_input_fails_with_one_line_naming_the_cause(project, tmp_path):
    procs = {}
    for name, (breaker, _) in BAD_INPUT.items():
        root = _copy(project, tmp_path / name)
        breaker(root)
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "stages.pretrain"],
            cwd=root,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        pattern = BAD_INPUT[name][1]
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1, f"{name}: {err[-2000:]}"
        assert len(lines) == 1 and re.search(pattern, lines[0]), f"{name}: {err[-2000:]}"
        assert "Traceback" not in err, name
        assert not (tmp_path / name / "models").exists(), f"{name}: no partial model"


def test_stage_relaunches_itself_under_torchrun(project, tmp_path):
    root = _copy(project, tmp_path / "ddp")
    shutil.rmtree(root / "checkpoints")
    _edit_params(root, "pretrain", nproc_per_node=2, max_steps=4)
    _run([sys.executable, "-m", "stages.pretrain"], root, timeout=180)
    state = json.loads((root / "checkpoints/pretrain/step_00000004/state.json").read_text())
    assert state["data_position"]["world_size"] == 2
    assert json.loads((root / "models/base/config.json").read_text())["training"]["steps"] == 4


def test_gpu_profile_becomes_valid_dvc_set_params(tmp_path):
    from pipeline.common.config import ConfigError
    from pipeline.common.profile import set_param_args

    root = Path(__file__).resolve().parents[2]
    args = set_param_args(root / "params-gpu.yaml", root / "params.yaml")
    pairs = dict(a.lstrip("+").split("=", 1) for a in args[1::2])
    assert args[0::2] == ["-S"] * len(pairs)
    assert pairs["model.preset"] == "gpt2-124m" and pairs["pretrain.dtype"] == "bf16"
    assert pairs["pretrain.compile"] == "true"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: gpt2-124m\npretrain:\n  warmup: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'pretrain.warmup'"):
        set_param_args(bad, root / "params.yaml")
