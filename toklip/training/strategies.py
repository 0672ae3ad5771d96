"""Distributed strategies for TokLIP runs (Lightning picks up torchrun and SLURM environments itself)."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ..checkpoints import StateDict
from ..distributed import module_from_first_rank_
from ..models.token_encoder import CausalBlock

# The token encoder's block, and any Hugging Face decoder layer (the generator's Llama, a comprehension LM).
WRAP_UNITS = {CausalBlock, GradientCheckpointingLayer}


def ddp() -> DDPStrategy:
    """Every trainable parameter takes part in every step (no unused-parameter search)."""
    return DDPStrategy(find_unused_parameters=False)


def fsdp(activation_checkpointing: bool = False, sharding_strategy: str = "FULL_SHARD") -> FSDPStrategy:
    """FSDP (GPUs) with the token encoder's causal block and every Hugging Face decoder layer as wrap units.

    `use_orig_params`: frozen (VQ, text tower, teacher) and trainable parameters share wrap units.
    `sync_module_states`: every rank starts from rank 0's weights, as under DDP (needs the GPU that
    Lightning passes as `device_id`; FSDP1 refuses it on CPU).
    """
    return FSDPStrategy(
        auto_wrap_policy=WRAP_UNITS,
        activation_checkpointing_policy=WRAP_UNITS if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        use_orig_params=True,
        sync_module_states=True,
    )


def fsdp2(data_parallel_size: str | int = "auto") -> ModelParallelStrategy:
    """FSDP2 through ModelParallelStrategy (runs on CPU with gloo too); sharding in TokLIPModule.configure_model.

    Checkpoints are gathered into one file that rank 0 writes through the trainer's CheckpointIO (written
    whole, with a checksum; `resume=latest` reads it), not a directory of shards that a kill can leave half
    written: a TokLIP model is small enough to gather."""
    return ModelParallelStrategy(data_parallel_size=data_parallel_size, tensor_parallel_size=1, save_distributed_checkpoint=False)


def shard_with_fsdp2(
    root: nn.Module, blocks: list[nn.Module], mesh, ignored_params: set[nn.Parameter] = frozenset(), forward_methods: tuple[str, ...] = ()
) -> None:
    """FSDP2 over the data-parallel dimension of `mesh`: each block, then `root` (its other weights,
    less `ignored_params`, which stay replicated); `forward_methods` of `root` gather its shards as
    `forward` does. Every rank starts from the first rank's weights, as under DDP: ranks built without
    one seed would otherwise shard a mix of their models. A root already sharded is left as it is:
    Lightning calls `configure_model` again for each fit, validate or test."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(root, FSDPModule):
        return
    data_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
    module_from_first_rank_(root, data_mesh.get_group(), torch.device(data_mesh.device_type))
    for block in blocks:
        fully_shard(block, mesh=data_mesh)
    fully_shard(root, mesh=data_mesh, ignored_params=set(ignored_params))
    for method in forward_methods:
        register_fsdp_forward_method(root, method)


def gathered_state_dict(module: nn.Module, sharded: bool) -> StateDict:
    """A module's weights as full CPU tensors; when `sharded` (FSDP2), gathered from every rank (collective)."""
    if not sharded:
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
