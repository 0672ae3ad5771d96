"""One safe way to read and write weights.

Every read goes through `read_checkpoint`: safetensors, or `torch.load(weights_only=True)` with an
explicit allow-list of the globals a known format needs. A pickle that asks for anything else is
refused before any of it runs, and the error names what it asked for. `load_state_dict_strict` loads
all-or-nothing and reports every missing, unexpected and shape-mismatched key.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

StateDict = dict[str, torch.Tensor]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe, or does not fit the model."""


def _numpy_scalar_globals() -> list[tuple[Any, str]]:
    # numpy >= 2 pickles scalars as numpy._core..., files written with numpy 1.x say numpy.core...
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    globals_ = [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    globals_ += [type(np.dtype(name)) for name in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return globals_


# The globals each known format needs beyond tensors and plain containers.
NUMPY_SCALARS = tuple(_numpy_scalar_globals())  # optimizer state of the released TokLIP checkpoints


# What torch.load raises on a truncated or garbage file (the unpickler fails in many ways).
_UNREADABLE_FILE_ERRORS = (RuntimeError, EOFError, KeyError, IndexError, ValueError, TypeError, zipfile.BadZipFile)


def describe_source(path: str | os.PathLike, source: str | None) -> str:
    """A path for error messages, with the config key or argument it came from."""
    return f"{path} (from {source})" if source else str(path)


def read_checkpoint(
    path: str | os.PathLike,
    *,
    source: str | None = None,
    allowed_globals: Iterable[Any] = (),
) -> Any:
    """Read a checkpoint safely. `source` names the config key or argument the path came from."""
    path = Path(path).expanduser()
    where = describe_source(path, source)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {where}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as err:
            raise CheckpointError(f"{where} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    allowed_globals = list(allowed_globals)
    try:
        with torch.serialization.safe_globals(allowed_globals):
            # Memory-map zip-format files: a released checkpoint is 8 GB, mostly optimizer state.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        foreign = _foreign_globals(path, allowed_globals)
        if foreign:
            raise CheckpointError(
                f"refusing to load {where}: it asks for Python objects outside the allow-list of its "
                f"format ({', '.join(foreign)}); nothing of it was executed"
            ) from None
        raise CheckpointError(f"{where} is not a PyTorch checkpoint: {err}") from None
    except _UNREADABLE_FILE_ERRORS as err:
        raise CheckpointError(f"{where} is truncated, corrupt or not a checkpoint: {err}") from None


def _foreign_globals(path: Path, allowed: list[Any]) -> list[str]:
    allowed_names = {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}" for entry in allowed}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy (non-zip) file: the unpickling error itself is the message
        return []
    return sorted(set(found) - allowed_names)


def find_state_dict(checkpoint: Any, keys: Iterable[str], *, where: str) -> StateDict:
    """The state dict under the first of `keys` present, or the checkpoint itself when it is one."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{where} holds a {type(checkpoint).__name__}, not a dict of weights")
    for key in keys:
        if key in checkpoint:
            checkpoint = checkpoint[key]
            break
    if not checkpoint or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointError(f"{where} has no state dict (looked for {', '.join(keys)} or bare tensors)")
    return dict(checkpoint)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Remove `prefix` from every key that has it (e.g. DDP's "module.")."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


@dataclass
class LoadReport:
    """What a load found: keys the model lacks, keys the file lacks, shapes that differ, keys dropped."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = []
        for title, keys in (("missing from the checkpoint", self.missing), ("unexpected in the checkpoint", self.unexpected)):
            if keys:
                lines.append(f"{len(keys)} {title}: {_abbreviate(keys)}")
        if self.mismatched:
            shown = ", ".join(f"{k} (model {m}, checkpoint {c})" for k, m, c in self.mismatched[:10])
            more = f" and {len(self.mismatched) - 10} more" if len(self.mismatched) > 10 else ""
            lines.append(f"{len(self.mismatched)} with another shape: {shown}{more}")
        if self.ignored:
            lines.append(f"{len(self.ignored)} ignored on purpose: {_abbreviate(self.ignored)}")
        return "\n".join(lines) or "all keys match"


def _abbreviate(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def compare_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    expected = module.state_dict()
    report = LoadReport(
        missing=[k for k in expected if k not in state_dict],
        unexpected=[k for k in state_dict if k not in expected],
    )
    for key, tensor in state_dict.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            report.mismatched.append((key, tuple(expected[key].shape), tuple(tensor.shape)))
    return report


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, where: str, ignored: Iterable[str] = ()
) -> LoadReport:
    """Load every key or none: on any difference raise a CheckpointError carrying the full report."""
    report = compare_state_dict(module, state_dict)
    report.ignored = list(ignored)
    if not report.ok:
        raise CheckpointError(f"{where} does not fit {type(module).__name__}:\n{report}")
    module.load_state_dict(state_dict, strict=True)
    return report


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write contiguous, unshared copies of the tensors atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)
    return path


def sidecar_path(weights: Path) -> Path:
    """The JSON file beside an export that describes it."""
    return weights.with_suffix(".json")


def save_with_sidecar(state_dict: Mapping[str, torch.Tensor], out: str | os.PathLike, description: dict[str, str]) -> Path:
    """Safetensors carrying `description` as metadata, and the same as a readable JSON file beside it."""
    out = save_safetensors(state_dict, out, metadata=description)
    sidecar_path(out).write_text(json.dumps(description, indent=2) + "\n")
    return out
