"""Process-group plumbing: join the group torchrun describes, and let a stage re-launch itself under torchrun.

A stage runs as ``python -m stages.pretrain``; when its params ask for several processes
(``nproc_per_node`` / ``nnodes``) it starts ``torchrun ... -m stages.pretrain`` as its child and every
worker then finds RANK / WORLD_SIZE / LOCAL_RANK in its environment. On several nodes the same command runs on
each (c10d rendezvous at ``rdzv_endpoint``). It knows nothing of DDP or FSDP (``train/loop.py``, ``sharded.py``).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.common.config import TrainParams
from pipeline.common.errors import PipelineError

# torchrun's rendezvous failures (torch.distributed.elastic.rendezvous.api): the nodes never met
_RENDEZVOUS_ERRORS = ("RendezvousTimeoutError", "RendezvousConnectionError", "RendezvousClosedError")


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
        store, rank, world_size = next(dist.rendezvous("env://"))
        # torchrun's store outlives an elastic restart: without a prefix per attempt the new group would read
        # the dead workers' addresses and fail to connect
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"attempt_{attempt}/", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(module: str, p: TrainParams) -> list[str]:
    """The torchrun command line that runs ``python -m module`` in ``nproc_per_node`` × ``nnodes`` workers."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={p.nproc_per_node}",
        f"--max_restarts={p.max_restarts}",  # a dead worker restarts the group, which resumes its checkpoint
    ]
    if p.nnodes > 1:
        if not p.rdzv_endpoint:
            raise PipelineError("params: nnodes > 1 needs rdzv_endpoint (host:port of the rendezvous)")
        cmd += [
            f"--nnodes={p.nnodes}",
            "--rdzv_backend=c10d",  # the same command on every node: the rendezvous numbers the nodes
            f"--rdzv_endpoint={p.rdzv_endpoint}",
            # join: waiting for the other nodes; read: a client's wait on an unreachable store
            f"--rdzv_conf=join_timeout={p.rdzv_timeout},read_timeout={p.rdzv_timeout}",
        ]
    else:
        cmd += ["--standalone"]  # one node: a local rendezvous, no endpoint needed
    return cmd + ["-m", module]


def relaunch_under_torchrun(module: str, p: TrainParams) -> None:
    """Run this stage under torchrun when several workers are asked for and we are not one yet.

    Returns only when the stage should run here (single process, or already a torchrun worker). Otherwise
    torchrun runs as a child, its output passed through; this process exits 0 when it succeeds, and a failure
    is one line (a rendezvous that did not complete names its endpoint).
    """
    if under_torchrun() or p.nproc_per_node * p.nnodes <= 1:
        return
    cmd = torchrun_command(module, p)
    tail: collections.deque[str] = collections.deque(maxlen=400)
    errors: list[str] = []  # the workers' own one-line errors: every rank may print the same one
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        for line in proc.stderr:  # passed through as it comes; the tail is kept to name the failure
            if line.startswith("error: "):
                errors.append(line.removeprefix("error: ").strip())
                continue
            sys.stderr.write(line)
            tail.append(line)
    if proc.returncode == 0:
        sys.exit(0)  # the workers did the stage's work (rank 0 wrote its outputs)
    if errors:  # the stage's own error, said once
        raise PipelineError(errors[0])
    if any(name in line for line in tail for name in _RENDEZVOUS_ERRORS):
        raise PipelineError(
            f"{module}: the rendezvous at {p.rdzv_endpoint} was not reached or did not gather {p.nnodes} nodes "
            f"within {p.rdzv_timeout} s (rdzv_endpoint, nnodes, rdzv_timeout)"
        )
    raise PipelineError(
        f"{module}: the torchrun workers failed (exit {proc.returncode}, max_restarts: {p.max_restarts}); "
        "their errors are above"
    )
