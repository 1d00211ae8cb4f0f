"""Data-parallel training across processes: ``torchrun --nproc-per-node N -m lenet train ...``.

torchrun starts N copies of ``lenet train`` with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set. Each
rank holds the whole (small) dataset, draws the same seeded permutation each epoch, and trains on
its own disjoint share of every batch: global batch ``perm[i*B:(i+1)*B]``, rank ``r`` takes every
N-th example of it starting at ``r``. DistributedDataParallel averages the gradients, so one step
is the step a single process takes on the whole batch of B (the recipe, learning rate included,
stays the same). Metrics are summed over ranks; rank 0 logs and writes the run folder. The
backend is gloo on CPU and NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world() -> World:
    """This process's place among the processes torchrun started (a world of one without torchrun)."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    return World(rank=_env_int("RANK", 0), size=size, local_rank=_env_int("LOCAL_RANK", 0),
                 local_size=_env_int("LOCAL_WORLD_SIZE", size))


def setup(w: World, device: torch.device) -> tuple[torch.device, bool]:
    """Join the process group (if not yet joined); return this rank's device and whether we joined."""
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", w.local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, True


def shard(batch_indices: torch.Tensor, w: World) -> torch.Tensor:
    """This rank's disjoint share of one global batch."""
    return batch_indices[w.rank::w.size] if w.active else batch_indices


def all_sum(values: torch.Tensor, w: World) -> torch.Tensor:
    """Element-wise sum over all ranks (a copy; the input is left alone)."""
    if not w.active:
        return values
    import torch.distributed as dist

    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def wrap(model: torch.nn.Module, device: torch.device, w: World) -> torch.nn.Module:
    if not w.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # no rank leaves while another still talks to it
        dist.destroy_process_group()
