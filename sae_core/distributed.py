"""Data-parallel training helpers over ``torch.distributed`` (DDP semantics).

``torchrun --nproc-per-node N -m training train ...`` starts N processes; each
calls :func:`init_from_env`, reads its own shards
(``ShardReader(..., rank=rank, world_size=world)``) and runs
:func:`sae_core.train.train_dictionary`, which averages gradients over the
processes so that every process holds the same dictionary.

Every helper works without a process group (torch.distributed unavailable, not
initialised, or one process): then there is one process, of rank 0, and the
collectives do nothing.
"""
from __future__ import annotations

import atexit
import datetime
import os
from typing import Iterable, Optional

import torch
from torch import Tensor

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR")


def _dist():
    """``torch.distributed`` when a process group is up, else None."""
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without a process group."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes files and logs."""
    return world()[0] == 0


def _active() -> bool:
    return world()[1] > 1


def all_reduce_sum_(tensors: Iterable[Tensor]) -> None:
    """Replace each tensor, in place, by its sum over the processes."""
    if _active():
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def all_reduce_mean_(tensors: Iterable[Tensor]) -> None:
    """Replace each tensor, in place, by its mean over the processes."""
    if _active():
        n = world()[1]
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
            t.div_(n)


def all_reduce_max_(tensors: Iterable[Tensor]) -> None:
    """Replace each tensor, in place, by its elementwise maximum over the processes."""
    if _active():
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)


def broadcast_(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite each tensor, in place, with rank ``src``'s copy."""
    if _active():
        for t in tensors:
            torch.distributed.broadcast(t, src=src)


def barrier() -> None:
    """Wait until every process gets here."""
    if _active():
        torch.distributed.barrier()


def init_from_env(
    device: str = "cpu", backend: Optional[str] = None, timeout: Optional[datetime.timedelta] = None
) -> tuple[int, int, str]:
    """Join the process group that ``torchrun`` describes; return ``(rank, world_size, device)``.

    With the torchrun environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``, ``LOCAL_RANK``) and no process group yet, one is created:
    ``backend`` defaults to ``"nccl"`` when ``device`` is CUDA and CUDA is
    available, else ``"gloo"``. A CUDA device becomes ``"cuda:LOCAL_RANK"``
    (one GPU per process). Without that environment: ``(0, 1, device)``. An
    existing process group is joined as it is.
    """
    dist = torch.distributed
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if dist.is_available() and not dist.is_initialized() and all(v in os.environ for v in _TORCHRUN_VARS):
        if backend is None:
            backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(_local_rank())
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend=backend, **kwargs)
        atexit.register(_destroy)
    rank, size = world()
    if cuda and _dist() is not None:
        device = f"cuda:{_local_rank()}"
    return rank, size, device


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", int(os.environ.get("RANK", 0)) % max(torch.cuda.device_count(), 1)))


def _destroy() -> None:
    if _dist() is not None:
        torch.distributed.destroy_process_group()
