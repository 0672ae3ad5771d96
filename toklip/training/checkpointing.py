"""Lightning checkpoints written whole or not at all, with a checksum that loading verifies."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from ..checkpoints import checksum_path, verify_checksum, write_atomically


def _is_local(path: _PATH) -> bool:
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every local checkpoint through `toklip.checkpoints.write_atomically`: a temporary file beside the
    target, fsynced and renamed over it, so `last.ckpt` is the old checkpoint or the new one, never part
    of one, whatever filesystem the run directory is on. Its SHA-256 is verified when it is loaded.
    Remote (fsspec) paths keep what their backend guarantees."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(path, buffer.getbuffer())

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if _is_local(path):
            verify_checksum(Path(path), str(path))
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: _PATH) -> None:
        super().remove_checkpoint(path)
        if _is_local(path):
            checksum_path(Path(path)).unlink(missing_ok=True)
