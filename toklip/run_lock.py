"""One writer at a time: an advisory file lock that the operating system releases when its holder
dies, so a killed run never leaves its directory locked."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from .config import ConfigError


@contextlib.contextmanager
def exclusive(lock_file: Path, *, what: str, wait: bool = False) -> Iterator[None]:
    """Hold `lock_file` for the block. Taken by another process: wait for it (`wait`), or a
    ConfigError naming `what` and the holder."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(f"{what} is in use by {holder}; wait for it to end, or choose another run_name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_first_process() -> bool:
    """Whether this process is rank 0 of its job (torchrun, SLURM, or Lightning's own launcher)."""
    return all(os.environ.get(variable, "0") == "0" for variable in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))
