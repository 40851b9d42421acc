"""Several nodes, really started: two torchrun "nodes" on 127.0.0.1 (c10d rendezvous, one process each) through
the pretrain stage's own relaunch, for DDP and FSDP, against the same world size on one node; and a node whose
rendezvous never completes fails with one line naming the endpoint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers.project import make_project, run, venv_env
from tests.helpers.serving import free_port

STAGE = [sys.executable, "-m", "stages.pretrain"]
# fp32: each node would otherwise time its own dtype choice
PRETRAIN = {"max_steps": 4, "checkpoint_every": 2, "dtype": "fp32"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A project whose tokenizer and shards are built (the pretrain stage's inputs)."""
    root = make_project(tmp_path_factory.mktemp("multinode") / "project", {"pretrain": PRETRAIN})
    run([sys.executable, "-m", "dvc", "repro", "tokenize"], root)
    return root


def _workspace(built: Path, dest: Path, **pretrain) -> Path:
    for name in ("pipeline", "stages", "data/tokenizer", "data/shards"):
        shutil.copytree(built / name, dest / name)
    params = yaml.safe_load((built / "params.yaml").read_text())
    params["pretrain"].update(pretrain)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def _start(root: Path) -> subprocess.Popen:
    env = {**venv_env(), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        STAGE, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_loopback_nodes_train_as_one_node_with_two_processes(built, parallel, tmp_path):
    one = _workspace(built, tmp_path / "one", parallel=parallel, nproc_per_node=2)
    _finish(_start(one))
    endpoint = f"127.0.0.1:{free_port()}"
    two = _workspace(built, tmp_path / "two", parallel=parallel, nnodes=2, rdzv_endpoint=endpoint)
    nodes = [_start(two), _start(two)]  # the same command on each node, as on a cluster
    errs = [_finish(node) for node in nodes]
    assert sum("pretrain: 4 steps" in err for err in errs) == 1, "rank 0 (on one node) publishes the model"
    expected = load_file(one / "models/base/model.safetensors")
    got = load_file(two / "models/base/model.safetensors")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_a_rendezvous_that_never_completes_is_one_line_naming_the_endpoint(built, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    alone = _workspace(built, tmp_path / "alone", nnodes=2, rdzv_endpoint=endpoint, rdzv_timeout=5)
    proc = _start(alone)  # the second node never comes
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, err[-3000:]
    assert len(lines) == 1 and endpoint in lines[0] and "5 s" in lines[0], err[-3000:]
    assert not (alone / "models").exists()


def test_a_workers_error_is_said_once_by_the_relaunching_stage(built, tmp_path):
    root = _workspace(built, tmp_path / "bad", nproc_per_node=2, parallel="fsdp", context_length=4096)
    proc = _start(root)
    _, err = proc.communicate(timeout=180)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, err[-3000:]
    assert len(lines) == 1 and "context_length" in lines[0], err[-3000:]
    assert not (root / "models").exists()
