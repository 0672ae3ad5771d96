"""The process group as toklip's own code sees it: none (one process), or the one DDP/FSDP set up."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_over_ranks_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum of `tensor` over all ranks (unchanged in one process)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def from_rank_zero_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: rank 0's `tensor` on every rank (unchanged in one process)."""
    if rank_and_world()[1] > 1:
        dist.broadcast(tensor, src=0)
    return tensor
