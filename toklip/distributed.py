"""The process group as toklip's own code sees it: none (one process), or the one DDP/FSDP set up."""

from __future__ import annotations

import itertools
import time

import torch
import torch.distributed as dist
from torch import nn

GLOO_GRACE_SECONDS = 0.1  # for gloo's worker threads to free the last collective's tensors (end_process_group)


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


def module_from_first_rank_(module: nn.Module, group: dist.ProcessGroup, device: torch.device) -> None:
    """In place: every rank of `group` takes its first rank's parameters and buffers, sent through
    `device` (the group's: CUDA for NCCL) one tensor at a time, so no rank holds a second whole model.

    DDP does this when it wraps a model; FSDP2 does not, and shards whatever each rank built. Tensors
    still on the meta device are skipped: they are initialised after sharding, shard by shard."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_meta:
            continue
        sent = tensor.detach().to(device)  # the tensor itself where it is already there (gloo)
        dist.broadcast(sent, group=group, group_src=0)
        tensor.detach().copy_(sent)


def end_process_group() -> None:
    """At a run's normal end on CPU (gloo): wait for every rank, destroy the group, and let gloo's worker
    threads finish; a no-op otherwise (Lightning ends NCCL groups itself). Not for error paths: the
    barrier would wait for ranks that never come.

    Why: a gloo worker thread frees each finished collective's tensors a moment after the caller has
    its result, taking the GIL to do so. If that moment falls in interpreter finalization, the process
    aborts with its work done ("terminate called without an active exception", SIGABRT; torch leaves
    this to the user). The barrier makes the last collective finish everywhere, and the pause gives the
    threads the GIL to free it. Measured in `experiments/gloo_exit_abort.py`."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.barrier()
        dist.destroy_process_group()
        time.sleep(GLOO_GRACE_SECONDS)  # releases the GIL
