"""DataLoader workers that leave SIGTERM to the main process.

A cluster that preempts a job signals its whole process group. The main process stops at the next
step boundary and checkpoints; a worker killed by the same signal would fail the run under it
("DataLoader worker ... killed by signal") first. So workers ignore SIGTERM, and are stopped otherwise:
by the loader's own shutdown when their iterator goes, and at interpreter exit, before multiprocessing's
exit handler (which would SIGTERM them and wait forever), through that shutdown for every live pool and
SIGKILL for any worker it left. `toklip.train` shuts its pools down when its fit ends, however it ends.
A worker still dies with a main process that is killed outright (torch's parent watchdog).

A worker is started with SIGTERM blocked, so a signal that comes before it has set itself to ignore
SIGTERM waits and is then dropped, instead of killing it. Here the signal is blocked in the starting
thread only, and only while it starts them: one sent meanwhile still reaches this process's handler,
through another thread or as the block lifts. A worker started by "fork" or "spawn" inherits the
block (a spawned one through exec). One started by "forkserver" (Python 3.14's default on Linux) is
forked by the fork server, which does not run under the block: a SIGTERM in the moment before such a
worker ignores it still kills it.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from multiprocessing import forkserver, resource_tracker
from multiprocessing.process import BaseProcess
from typing import Any

from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

_live_pools: weakref.WeakSet[_MultiProcessingDataLoaderIter] = weakref.WeakSet()
_workers: list[BaseProcess] = []  # every worker this process started for a SignalSafeLoader and that may live


def _init_worker(worker_id: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # drops a SIGTERM that came while it was blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    pl_worker_init_function(worker_id)  # seeded as Lightning seeds workers


@contextmanager
def _sigterm_blocked() -> Iterator[None]:
    blocked_before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked_before)


def _start_helper_processes(start_method: str) -> None:
    """Start multiprocessing's helper processes for `start_method` before SIGTERM is blocked, not inside
    the block: starting the resource tracker ("spawn", "forkserver") unblocks SIGTERM in the starting
    thread, which would undo the block for the workers started after it; and a fork server started
    under the block would keep it, passing it on to every process it forks, toklip's workers or not."""
    if start_method in ("spawn", "forkserver"):
        resource_tracker.ensure_running()
    if start_method == "forkserver":
        forkserver.ensure_running()


def _live_workers_of_this_process() -> list[BaseProcess]:
    # A process forked after the list was filled (a fork-based launcher) inherits it, but can neither
    # test nor stop its parent's workers.
    return [worker for worker in _workers if worker._parent_pid == os.getpid() and worker.is_alive()]


def shut_down_worker_pools() -> None:
    """Stop the workers of every live `SignalSafeLoader` pool through the loader's own shutdown: at the end
    of a fit, rather than whenever garbage collection gets to them (a shutdown run by the collector, e.g.
    inside a `torch.device("meta")` block, was seen to leave its worker waiting for ever)."""
    for pool in list(_live_pools):
        pool._shutdown_workers()
    _live_pools.clear()


def _stop_all_workers_at_exit() -> None:
    """Shut down the live pools, then SIGKILL any worker a pool left behind."""
    shut_down_worker_pools()
    stragglers = _live_workers_of_this_process()
    if stragglers:
        # torch's SIGCHLD handler would raise on the first kill ("worker killed by signal") and end this
        # handler before the others; at exit there is no loader left to protect.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in stragglers:
        worker.kill()
    for worker in stragglers:
        worker.join(timeout=5)
    _workers.clear()


# Registered after torch imported multiprocessing, so it runs before multiprocessing's exit handler.
atexit.register(_stop_all_workers_at_exit)


class SignalSafeLoader(DataLoader):
    """A DataLoader whose worker processes ignore SIGTERM (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("num_workers", 0) > 0 and kwargs.get("worker_init_fn") is None:
            kwargs["worker_init_fn"] = _init_worker
        super().__init__(*args, **kwargs)

    def _get_iterator(self):
        starts_ignoring = self.worker_init_fn is _init_worker  # set by __init__ where there are workers
        if starts_ignoring:
            _start_helper_processes((self.multiprocessing_context or multiprocessing).get_start_method())
        with _sigterm_blocked() if starts_ignoring else nullcontext():  # until each worker ignores it itself
            iterator = super()._get_iterator()
        if isinstance(iterator, _MultiProcessingDataLoaderIter):
            _live_pools.add(iterator)
            _workers[:] = _live_workers_of_this_process() + iterator._workers
        return iterator
