"""DDP plumbing: join the process group torchrun describes, and let a stage re-launch itself under torchrun.

A stage runs as ``python -m stages.pretrain``; when its params ask for several processes
(``nproc_per_node`` / ``nnodes``) it replaces itself with ``torchrun ... -m stages.pretrain`` and every
worker then finds RANK / WORLD_SIZE / LOCAL_RANK in its environment.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.common.errors import PipelineError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: torch.device) -> DistContext:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op for a single process."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(
    module: str, nproc_per_node: int, nnodes: int = 1, rdzv_endpoint: str | None = None
) -> list[str]:
    """The torchrun command line that runs ``python -m module`` in ``nproc_per_node`` × ``nnodes`` workers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise PipelineError("params: nnodes > 1 needs rdzv_endpoint (host:port of the rendezvous)")
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", module]


def relaunch_under_torchrun(
    module: str, nproc_per_node: int, nnodes: int = 1, rdzv_endpoint: str | None = None
) -> None:
    """Replace this process with torchrun when several workers are asked for and we are not one yet.

    Returns only when the stage should run here (single process, or already a torchrun worker).
    """
    if under_torchrun() or nproc_per_node * nnodes <= 1:
        return
    cmd = torchrun_command(module, nproc_per_node, nnodes, rdzv_endpoint)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
