"""Training checkpoints: full state, written atomically, verified on load, newest good one wins.

A checkpoint is a directory ``<checkpoint_dir>/step_00000100/`` renamed into place only when complete:
  model/          a model directory (safetensors weights + config.json, as ``checkpoint.save_model`` writes)
                  or, for a LoRA run, adapter/ instead: the adapter tensors and their record, which names the
                  fingerprint of the frozen base weights they were trained on
                  or, for ``parallel: fsdp``, shards/ instead: weights and optimizer state as Distributed
                  Checkpoint files, each rank's written by that rank (``train/sharded.py``; every rank calls the
                  sharded save and load, and the directory must be one every node sees)
  trainer.pt      optimizer (not with shards/), scheduler and RNG states (tensors and plain data: loads with
                  weights_only=True)
  state.json      step, run key, data position, logged history, and the sha256 of every other file
                  (written last: a checkpoint whose hashes do not match is corrupt)

The run key identifies the run (model shape, initial weights, training params, data): checkpoints left by
a different run in the same directory (DVC keeps ``checkpoints/`` between experiments) are never resumed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.common.atomic import atomic_path, fsync_tree
from pipeline.common.errors import PipelineError, one_line
from pipeline.common.hashing import sha256_file
from pipeline.model import lora
from pipeline.model.checkpoint import ADAPTER, WEIGHTS, load_state_into, save_model, save_tensors
from pipeline.model.gpt import GPT
from pipeline.train import sharded

log = logging.getLogger(__name__)

STATE = "state.json"
TRAINER = "trainer.pt"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
SHARDS_DIR = "shards"
PREFIX = "step_"
# Tests set this to a step number: the process SIGKILLs itself right after that checkpoint is fsynced (only the
# rank named by KILL_RANK when it is set; under torchrun only in its first attempt, so a restart runs on).
KILL_AFTER_CHECKPOINT = "LLM_PIPELINE_KILL_AFTER_CHECKPOINT"
KILL_RANK = "LLM_PIPELINE_KILL_RANK"


class CorruptCheckpoint(PipelineError):
    """A checkpoint that cannot be trusted: missing file, hash mismatch, unreadable tensors."""


@dataclass
class Restored:
    path: Path
    state: dict  # state.json
    trainer: dict  # trainer.pt


@dataclass
class Shards:
    """What a sharded checkpoint holds besides trainer.pt: the sharded model and its optimizer (all ranks')."""

    optimizer: torch.optim.Optimizer
    is_main: bool


def checkpoint_path(checkpoint_dir: Path, step: int) -> Path:
    return checkpoint_dir / f"{PREFIX}{step:08d}"


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoint directories, newest step first (temp dirs of an interrupted save are not listed)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: p.name, reverse=True)  # zero-padded steps: name order is step order


def save_checkpoint(checkpoint_dir: Path, step: int, model: GPT, trainer: dict, state: dict) -> Path:
    """Write a complete checkpoint for ``step`` atomically; returns its directory."""
    final = checkpoint_path(checkpoint_dir, step)
    with atomic_path(final) as tmp:  # a hidden temp directory, renamed to `final` when complete
        tmp.mkdir()
        info = lora.adapter_info(model)
        if info is None:
            save_model(tmp / MODEL_DIR, model)
        else:
            (tmp / ADAPTER_DIR).mkdir()
            save_tensors(lora.adapter_state(model), tmp / ADAPTER_DIR / ADAPTER)
            (tmp / ADAPTER_DIR / "adapter.json").write_text(json.dumps(info.to_dict(), indent=1) + "\n")
        _seal(tmp, step, trainer, state)
    fsync_tree(final)  # on disk before training goes on: a crash after this point keeps the checkpoint
    _crash_if_asked(step)
    return final


def save_sharded_checkpoint(
    checkpoint_dir: Path, step: int, model: torch.nn.Module, shards: Shards, trainer: dict, state: dict
) -> Path:
    """Every rank writes its shards of ``step``'s checkpoint; rank 0 seals it and renames it into place."""
    final = checkpoint_path(checkpoint_dir, step)
    with atomic_path(final) if shards.is_main else contextlib.nullcontext() as tmp:
        if shards.is_main:
            tmp.mkdir()
        if dist.is_initialized():  # every rank writes into rank 0's temp directory
            shared = [str(tmp) if shards.is_main else None]
            dist.broadcast_object_list(shared, src=0)
            tmp = Path(shared[0])
        sharded.save_state(tmp / SHARDS_DIR, model, shards.optimizer)  # returns when every rank's are written
        if shards.is_main:
            _seal(tmp, step, trainer, state)
    if shards.is_main:
        fsync_tree(final)
    if dist.is_initialized():
        dist.barrier()  # the checkpoint is in place before any rank goes on (or is killed below)
    _crash_if_asked(step)
    return final


def _seal(tmp: Path, step: int, trainer: dict, state: dict) -> None:
    """trainer.pt, then state.json with the sha256 of every file in ``tmp``."""
    # tensors and plain data only, so it loads with weights_only=True; through a Python file, so that a full
    # disk is an OSError (errno 28) naming the file, not torch's "file write failed" RuntimeError (torch
    # raises its own "unexpected pos" on top of a failed write: the OSError is its context)
    with (tmp / TRAINER).open("wb") as out:
        try:
            torch.save(trainer, out)
        except (OSError, RuntimeError) as exc:
            failed = exc if isinstance(exc, OSError) else exc.__context__
            if not isinstance(failed, OSError):
                raise
            raise OSError(failed.errno, failed.strerror, str(tmp / TRAINER)) from exc
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    hashes = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in files}
    # state.json last: it vouches for every file written before it
    (tmp / STATE).write_text(json.dumps({**state, "step": step, "files": hashes}, indent=1) + "\n")


def _crash_if_asked(step: int) -> None:
    """The tests' deterministic crash: checkpoint ``step`` is on disk, no later."""
    if os.environ.get(KILL_AFTER_CHECKPOINT) != str(step):
        return
    if os.environ.get(KILL_RANK, os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":  # torchrun's restarted group runs on
        return
    os.kill(os.getpid(), signal.SIGKILL)


def read_state(path: Path) -> dict:
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpoint(f"{path / STATE}: unreadable ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict) or "step" not in state:
        raise CorruptCheckpoint(f"{path / STATE}: not a training checkpoint state")
    return state


def load_checkpoint(path: Path, model: GPT, state: dict, shards: Shards | None = None) -> Restored:
    """Verify every file's hash, then load the weights into ``model``; raises CorruptCheckpoint.

    With ``shards`` (a collective) the weights and optimizer state come from the checkpoint's shards/,
    resharded to this run's world size."""
    for name, expected in state["files"].items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{file}: missing")
        if sha256_file(file) != expected:
            raise CorruptCheckpoint(f"{file}: contents do not match the recorded sha256")
    if shards is not None:
        try:
            trainer = torch.load(path / TRAINER, map_location="cpu", weights_only=True)
            sharded.load_state(path / SHARDS_DIR, model, shards.optimizer)
        except (OSError, RuntimeError, sharded.UnreadableShards) as exc:
            raise CorruptCheckpoint(
                f"{path}: unreadable ({exc.__class__.__name__}: {one_line(str(exc))})"
            ) from None
        return Restored(path, state, trainer)
    info = lora.adapter_info(model)
    weights_path = path / MODEL_DIR / WEIGHTS if info is None else path / ADAPTER_DIR / ADAPTER
    try:
        # on the CPU: RNG states must be CPU tensors, and the optimizer's load_state_dict moves its state to the params' device
        trainer = torch.load(path / TRAINER, map_location="cpu", weights_only=True)
        weights = load_file(str(weights_path))
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise CorruptCheckpoint(f"{path}: unreadable ({exc.__class__.__name__})") from None
    if info is None:
        load_state_into(model, weights, str(weights_path))
        return Restored(path, state, trainer)
    recorded = json.loads((path / ADAPTER_DIR / "adapter.json").read_text())  # its hash was verified above
    if recorded.get("base_fingerprint") != info.base_fingerprint:  # an adapter is only valid on its own base
        raise CorruptCheckpoint(
            f"{path}: adapter trained on base {str(recorded.get('base_fingerprint'))[:12]}, "
            f"not on this base {info.base_fingerprint[:12]}"
        )
    lora.load_adapter_state(model, weights, str(weights_path))
    return Restored(path, state, trainer)


def remove_interrupted(checkpoint_dir: Path) -> list[Path]:
    """Delete what a save killed mid-write left: ``atomic_path``'s hidden ``.step_*`` temp directories."""
    if not checkpoint_dir.is_dir():
        return []
    leftovers = sorted(p for p in checkpoint_dir.iterdir() if p.name.startswith(f".{PREFIX}"))
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():  # a link is unlinked, never followed
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if leftovers:
        log.warning(
            "removed %d temp entr%s of an interrupted checkpoint write: %s",
            len(leftovers),
            "y" if len(leftovers) == 1 else "ies",
            ", ".join(str(p) for p in leftovers),
        )
    return leftovers


def restore_latest(
    checkpoint_dir: Path, model: GPT, run_key: str, shards: Shards | None = None
) -> Restored | None:
    """Load the newest good checkpoint of this run into ``model`` (after removing interrupted writes' leftovers).

    A corrupt newer checkpoint is skipped with a warning; checkpoints of another run are ignored.
    Raises CorruptCheckpoint when checkpoints exist but none of them is usable and at least one is corrupt.
    """
    remove_interrupted(checkpoint_dir)
    corrupt: list[CorruptCheckpoint] = []
    for path in list_checkpoints(checkpoint_dir):
        try:
            state = read_state(path)
            if state.get("run_key") != run_key:  # another run's checkpoint: not ours, but not corrupt either
                continue
            restored = load_checkpoint(path, model, state, shards)
        except CorruptCheckpoint as exc:
            log.warning("corrupt checkpoint skipped, falling back to the previous one: %s", exc)
            corrupt.append(exc)
            continue
        return restored
    if corrupt:
        raise CorruptCheckpoint(
            f"no usable checkpoint in {checkpoint_dir}: {corrupt[0]} (delete it to start over)"
        )
    return None


def prune(checkpoint_dir: Path, run_key: str, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints of this run; drop older ones and those of other runs."""
    kept = 0
    for path in list_checkpoints(checkpoint_dir):
        try:
            ours = read_state(path).get("run_key") == run_key
        except CorruptCheckpoint:
            ours = False  # an unreadable checkpoint is dropped too
        if ours and kept < keep:
            kept += 1
            continue
        shutil.rmtree(path, ignore_errors=True)
