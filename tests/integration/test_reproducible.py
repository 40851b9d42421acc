"""Same params and seed → the same results on CPU: `dvc repro evaluate` in two fresh copies of the tiny project
gives byte-identical evaluation metrics, weights, tokenizer and shards, and the same loss curve; and outputs
record where they came from (commit, params hash, package versions)."""

from __future__ import annotations

import json
import subprocess
from importlib import metadata

import pandas as pd
import pytest
import yaml

from pipeline.common.errors import PipelineError
from pipeline.common.provenance import provenance
from pipeline.orchestration import dvc_ops
from tests.helpers.project import make_project
from tests.helpers.trivial_project import make_trivial_project

pytestmark = pytest.mark.timeout(600)


def lock_hashes(project) -> dict[str, str]:
    """{output path: md5} of every DVC-cached output in dvc.lock: equal hashes mean byte-identical outputs."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {
        o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", []) if "md5" in o
    }


def test_two_fresh_runs_give_identical_results(tmp_path):
    runs = []
    for name in ("first", "second"):
        project = make_project(tmp_path / name)
        done = dvc_ops.dvc(project, "repro", "evaluate")
        assert "Running stage 'evaluate'" in done.stdout
        runs.append(project)
    first, second = runs

    evaluation = (first / "reports/evaluate/metrics.json").read_bytes()
    assert evaluation == (second / "reports/evaluate/metrics.json").read_bytes()
    assert json.loads(evaluation)["bits_per_byte"] > 0
    for path in ("reports/evaluate/samples.json", "models/base/model.safetensors"):
        assert (first / path).read_bytes() == (second / path).read_bytes(), path
    hashes = lock_hashes(first)
    assert {"data/tokenizer", "data/shards", "models/base"} <= set(hashes)
    assert {k: v for k, v in hashes.items() if k in ("data/raw", "data/tokenizer", "data/shards")} == {
        k: v for k, v in lock_hashes(second).items() if k in ("data/raw", "data/tokenizer", "data/shards")
    }

    curve = "reports/pretrain/plots/metrics/train/loss.tsv"  # dvclive's timestamp column differs, the losses must not
    losses = [pd.read_csv(p / curve, sep="\t")[["step", "loss"]] for p in runs]
    pd.testing.assert_frame_equal(losses[0], losses[1], check_exact=True)
    pretrain = [json.loads((p / "reports/pretrain/metrics.json").read_text()) for p in runs]
    assert (
        pretrain[0]["val"] == pretrain[1]["val"]
        and pretrain[0]["train"]["loss"] == pretrain[1]["train"]["loss"]
    )

    recorded = [json.loads((p / "models/base/config.json").read_text())["provenance"] for p in runs]
    for project, record in zip(runs, recorded, strict=False):
        assert record["git"]["commit"] == head(project)
    assert (
        recorded[0]["params"]["sha256"] == recorded[1]["params"]["sha256"]
    )  # same params, different commits


def head(project) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True
    ).stdout.strip()


def test_provenance_records_commit_dirty_flag_params_hash_and_versions(tmp_path):
    project = make_trivial_project(tmp_path / "project")
    record = provenance(["train"], root=project)
    assert record["git"] == {"commit": head(project), "dirty": False}
    assert record["params"]["sections"] == ["train"]
    assert record["packages"]["dvc"] == metadata.version("dvc")
    assert record["packages"]["prefect"] == metadata.version("prefect")
    assert record["packages"]["torch"] == metadata.version("torch")
    assert record["python"].count(".") == 2

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["download"]["size"] = 5  # another section: the hash of `train` stays, the tree is dirty
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    changed = provenance(["train"], root=project)
    assert changed["params"]["sha256"] == record["params"]["sha256"]
    assert changed["git"]["dirty"] is True
    params["train"]["lr"] = 0.3
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert provenance(["train"], root=project)["params"]["sha256"] != record["params"]["sha256"]
    with pytest.raises(PipelineError, match="no section 'nope'"):
        provenance(["nope"], root=project)
    outside_git = tmp_path / "plain"
    outside_git.mkdir()
    (outside_git / "params.yaml").write_text("seed: 1\n")
    assert provenance(root=outside_git)["git"] == {"commit": None, "dirty": None}
