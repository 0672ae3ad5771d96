"""One safe way to read and write weights.

Every read goes through `read_checkpoint`: safetensors, or `torch.load(weights_only=True)` with an
explicit allow-list of the globals a known format needs. A pickle that asks for anything else is
refused before any of it runs, and the error names what it asked for. `load_state_dict_strict` loads
all-or-nothing and reports every missing, unexpected and shape-mismatched key.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
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
from safetensors.torch import load_file, save
from torch import nn

StateDict = dict[str, torch.Tensor]

log = logging.getLogger(__name__)


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
    verify: bool = True,
) -> Any:
    """Read a checkpoint safely. `source` names the config key or argument the path came from;
    `verify=False` skips the checksum (a quick look, e.g. at a checkpoint's step)."""
    path = Path(path).expanduser()
    where = describe_source(path, source)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {where}")
    if verify:
        verify_checksum(path, where)
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
        return self.describe(limit=10)

    def describe(self, limit: int | None = None) -> str:
        """The report, each list cut after `limit` entries (None: whole, as a failed load prints it)."""
        mismatched = [f"{k} (model {m}, checkpoint {c})" for k, m, c in self.mismatched]
        lines = [
            f"{len(keys)} {title}: {_abbreviate(keys, limit)}"
            for title, keys in (
                ("missing from the checkpoint", self.missing),
                ("unexpected in the checkpoint", self.unexpected),
                ("with another shape", mismatched),
                ("ignored on purpose", self.ignored),
            )
            if keys
        ]
        return "\n".join(lines) or "all keys match"


def _abbreviate(keys: list[str], limit: int | None) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if limit is not None and len(keys) > limit else "")


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
        raise CheckpointError(f"{where} does not fit {type(module).__name__}; nothing was loaded:\n{report.describe()}")
    module.load_state_dict(state_dict, strict=True)
    return report


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write contiguous, unshared copies of the tensors atomically, with a checksum (`write_atomically`)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    return write_atomically(path, save(tensors, metadata=metadata))


def checksum_path(path: Path) -> Path:
    """The SHA-256 file beside a checkpoint or export that `read_checkpoint` verifies."""
    return path.with_name(path.name + ".sha256")


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: beside it, so the rename is atomic."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomically(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write `data` whole or not at all, on any local filesystem: to a temporary file in the destination
    directory, fsynced, renamed over `path`, the directory fsynced. Its SHA-256 goes beside it, so bit
    rot reads as damage, not as weights. The checksum file lists the old digest and the new one while the
    data is renamed, so a kill between the two files never makes a whole file look damaged. A full disk
    is an error naming the path and the size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()
    replace_file(checksum_path(path), "".join(f"{d}  {path.name}\n" for d in (digest, *_recorded_digests(path))).encode())
    replace_file(path, data)
    replace_file(checksum_path(path), f"{digest}  {path.name}\n".encode())
    return path


def publish(temporary: Path, target: Path) -> None:
    """Give a fully written file its name: fsync it, rename it over `target`, fsync the directory."""
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def replace_file(target: Path, content: bytes | memoryview) -> None:
    """Write `content` over `target` whole or not at all (no checksum: for small records such as metrics)."""
    temporary = temporary_path(target)
    try:
        with open(temporary, "wb") as handle:
            handle.write(content)
        publish(temporary, target)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise CheckpointError(f"no space left to write {target} ({len(content):,} bytes); what was there before is intact") from err
        raise


def _recorded_digests(path: Path) -> list[str]:
    recorded = checksum_path(path)
    return [line.split()[0] for line in recorded.read_text().splitlines() if line.strip()] if recorded.is_file() else []


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path: Path, where: str) -> None:
    """When a checksum file lies beside `path`, the file must match a digest it lists."""
    recorded = _recorded_digests(path)
    if recorded and file_sha256(path) not in recorded:
        raise CheckpointError(f"{where} does not match its checksum ({checksum_path(path).name}): the file is damaged")


def sidecar_path(weights: Path) -> Path:
    """The JSON file beside an export that describes it."""
    return weights.with_suffix(".json")


def read_sidecar(weights: Path, key: str, hint: str) -> dict[str, Any]:
    """The description beside an export, which must record `key`; `hint` says what to do otherwise."""
    if not Path(weights).is_file():
        raise CheckpointError(f"checkpoint not found: {weights}")
    sidecar = sidecar_path(weights)
    if not sidecar.is_file():
        raise CheckpointError(f"{weights}: no {sidecar.name} beside it recording its {key} ({hint})")
    try:
        description = json.loads(sidecar.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{sidecar}: not JSON ({err})") from None
    if not isinstance(description, dict) or key not in description:
        raise CheckpointError(f"{sidecar} records no {key} ({hint})")
    return description


def save_with_sidecar(state_dict: Mapping[str, torch.Tensor], out: str | os.PathLike, description: dict[str, str]) -> Path:
    """Safetensors carrying `description` as metadata, and the same as a readable JSON file beside it."""
    out = save_safetensors(state_dict, out, metadata=description)
    write_atomically(sidecar_path(out), (json.dumps(description, indent=2) + "\n").encode())
    return out


def newest_readable_checkpoint(candidates: Iterable[Path]) -> Path:
    """The training checkpoint with the highest global step that reads back whole (its checksum too);
    each unreadable one is skipped with a warning naming it. None readable: an error listing them."""
    by_step, unreadable = [], []
    for path in candidates:
        try:
            by_step.append((int(read_checkpoint(path, verify=False)["global_step"]), path))
        except (CheckpointError, KeyError, TypeError) as err:
            unreadable.append(f"{path.name} ({err})")
    for _, path in sorted(by_step, key=lambda item: item[0], reverse=True):
        try:
            verify_checksum(path, str(path))
            break
        except CheckpointError as err:
            unreadable.append(f"{path.name} ({err})")
    else:
        raise CheckpointError(f"no checkpoint reads back whole: {'; '.join(unreadable) or 'none found'}")
    for entry in unreadable:
        log.warning("resume: skipped the unreadable checkpoint %s", entry)
    return path


def _writer_pid(path: Path) -> int | None:
    """The process writing `path` if it is a `temporary_path`, else None."""
    stem, marker, pid = path.name.rpartition(".tmp-")
    return int(pid) if stem.startswith(".") and marker and pid.isdigit() else None


def is_temporary(path: Path) -> bool:
    """Whether `path` is a `temporary_path`: a file being written, or left by a killed writer."""
    return _writer_pid(path) is not None


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files that killed writers left in `directory` (those of live processes stay)."""
    removed = []
    for temporary in filter(is_temporary, directory.glob(".*.tmp-*")):
        if not _process_alive(_writer_pid(temporary)):
            temporary.unlink(missing_ok=True)
            removed.append(temporary)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
