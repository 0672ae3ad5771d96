"""Distributed strategies for TokLIP runs (Lightning picks up torchrun and SLURM environments itself)."""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from ..models.token_encoder import CausalBlock


def ddp() -> DDPStrategy:
    """Every trainable parameter takes part in every step (no unused-parameter search)."""
    return DDPStrategy(find_unused_parameters=False)


def fsdp(activation_checkpointing: bool = False, sharding_strategy: str = "FULL_SHARD") -> FSDPStrategy:
    """FSDP (GPUs) with the token encoder's causal block as the wrap unit.

    `use_orig_params`: frozen (VQ, text tower, teacher) and trainable parameters share wrap units.
    """
    return FSDPStrategy(
        auto_wrap_policy={CausalBlock},
        activation_checkpointing_policy={CausalBlock} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        use_orig_params=True,
    )


def fsdp2(data_parallel_size: str | int = "auto") -> ModelParallelStrategy:
    """FSDP2 through ModelParallelStrategy (runs on CPU with gloo too); sharding in TokLIPModule.configure_model.

    Checkpoints are gathered into one file that rank 0 writes through the trainer's CheckpointIO (written
    whole, with a checksum; `resume=latest` reads it), not a directory of shards that a kill can leave half
    written: a TokLIP model is small enough to gather."""
    return ModelParallelStrategy(data_parallel_size=data_parallel_size, tensor_parallel_size=1, save_distributed_checkpoint=False)
