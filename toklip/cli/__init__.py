"""Console entry points: each a thin Hydra main over a plain function."""

import datetime
import os

from omegaconf import OmegaConf

CONFIG_PATH = "pkg://toklip.conf"  # the configs ship inside the package


def run_id() -> str:
    """One name for a run on every rank: the SLURM job or torchrun run id, else the start time."""
    for variable in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(variable)
        if value and value != "none":
            return f"{variable.split('_')[0].lower()}-{value}"
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def resolve_device(name: str) -> str:
    """`auto`: the GPU when there is one."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if not OmegaConf.has_resolver("toklip_run_id"):
    OmegaConf.register_new_resolver("toklip_run_id", run_id, use_cache=True)
