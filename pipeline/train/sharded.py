"""FSDP2 and Distributed Checkpoint (DCP) for the one loop: shard a model, save and load its sharded state.

- ``shard``: ``fully_shard`` on each transformer block, then on the root (embeddings, final norm, head); with
  bf16 the blocks compute in bf16 and gradients are reduced in fp32 (the master weights stay fp32).
- ``save_state`` / ``load_state``: model + optimizer state as DCP shards, each rank writing its own; loading
  reshards to this run's world size (or loads whole into an unsharded model, one process).
- Nothing read runs code: DCP pickles its ``.metadata`` (torch's ``FileSystemReader`` unpickles it with plain
  ``pickle``) and stores non-tensor items with ``torch.save`` (read back with ``weights_only=False``).
  ``SafeReader`` unpickles the metadata with an allow-list of DCP's own record classes, and ``SafeLoadPlanner``
  reads items with ``weights_only=True``.
- ``gather_whole``: the full weights on rank 0, in an unsharded copy (``skeleton`` made before sharding).

It knows nothing of checkpoint directories, digests or steps (``train/resume.py``) or of the loop.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint._nested_dict import set_element  # DCP's own helper (as its planner uses)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

# What DCP's .metadata may contain: the classes of its records, torch sizes and dtypes, paths, containers.
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by name (torch.strided), as weights_only allows it
    ("pathlib", "PosixPath"),  # StorageMeta's checkpoint_id
}


class UnreadableShards(Exception):
    """A sharded state that DCP could not read (a missing shard, metadata naming something not allowed)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)  # torch.float32 …
        if (module, name) in _ALLOWED or module in _ALLOWED_MODULES or dtype:  # nothing else is even imported
            found = super().find_class(module, name)
            # of DCP's modules, their classes only: never one of their functions
            if module not in _ALLOWED_MODULES or isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}, which is not allowed")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader whose metadata unpickling accepts only DCP's own records."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor items (optimizer hyperparameters, steps) read back with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def skeleton(model: nn.Module) -> nn.Module:
    """An unsharded copy of ``model`` whose parameters are on the meta device (no memory), ties kept."""
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)  # buffers are copied as they are (small: masks, rotary tables)


def shard(model: nn.Module, blocks: nn.ModuleList, dtype: torch.dtype) -> nn.Module:
    """FSDP2 in place: each block its own unit (gathered only while it computes), then the root."""
    policy = MixedPrecisionPolicy(
        param_dtype=dtype if dtype != torch.float32 else None,  # None: compute in the parameters' fp32
        reduce_dtype=torch.float32,  # gradients summed in fp32 whatever the compute dtype
    )
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Accumulation: reduce-scatter the gradients on the last micro-step only (FSDP2's ``no_sync``)."""
    model.set_requires_gradient_sync(sync)


@contextlib.contextmanager
def _one_process_quietly():
    """DCP warns that it "assumes a single process" on every save and load without a group: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


def save_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the weights and optimizer state into ``directory`` (a collective)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    with _one_process_quietly():
        dcp.save(
            {"model": model_state, "optim": optim_state},
            storage_writer=dcp.FileSystemWriter(directory),
            no_dist=not dist.is_initialized(),  # one process: no group to coordinate with
        )


def load_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load ``directory``'s shards into this world size's shards of ``model`` and ``optimizer`` (a collective)."""
    model_state, optim_state = get_state_dict(model, optimizer)  # the shapes to fill: this run's shards
    state = {"model": model_state, "optim": optim_state}
    try:
        with _one_process_quietly():
            dcp.load(
                state,
                storage_reader=SafeReader(directory),
                planner=SafeLoadPlanner(),
                no_dist=not dist.is_initialized(),
            )
    except CheckpointException as exc:  # DCP gathers each rank's failure: the first one says what was wrong
        first = next(iter(exc.failures.values()), exc)
        raise UnreadableShards(str(getattr(first, "exc", first))) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def gather_whole(model: nn.Module, whole: nn.Module, is_main: bool, device: torch.device) -> nn.Module:
    """The full weights of sharded ``model`` loaded into ``whole`` (its skeleton) on rank 0, on ``device`` as the
    unsharded model would be; a collective."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:  # cpu_offload: only rank 0 receives the full tensors
        return model
    whole.load_state_dict(state, assign=True)  # the meta parameters replaced by the gathered tensors
    tied = getattr(getattr(whole, "cfg", None), "tie_weights", False)
    if tied:  # assign gave the tied head its own Parameter: tie it again
        whole.out_head.weight = whole.tok_emb.weight
    return whole.to(device)  # gathered on the CPU (cpu_offload)
