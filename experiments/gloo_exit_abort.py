"""How often a two-rank CPU (gloo) run aborts at exit when its last collective is a gather.

Each run is two processes that shard a small model with FSDP2, take one step and gather every weight
whole (as the FSDP2 tests do after `fit`), then end one of four ways: exit as they are, destroy the
process group, a barrier then destroy it, or `toklip.distributed.end_process_group()` (that, then a
pause that lets gloo's worker threads free the last tensors). A run counts as aborted when either rank's
exit status is not 0 (SIGABRT: "terminate called without an active exception"). Prints a table.

    python experiments/gloo_exit_abort.py --runs 50 [--endings exit end_process_group]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

ENDINGS = ("exit", "destroy_process_group", "barrier_then_destroy", "end_process_group")

RANK = """
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from toklip.distributed import end_process_group

rank, ending = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", rank=rank, world_size=2)
mesh = init_device_mesh("cpu", (2,))
model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
for layer in model:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
model(torch.randn(4, 256)).sum().backward()
sums = [float(p.full_tensor().detach().sum()) for p in model.parameters()]  # the last collective: a gather
if ending == "barrier_then_destroy":
    dist.barrier()
if ending in ("destroy_process_group", "barrier_then_destroy"):
    dist.destroy_process_group()
elif ending == "end_process_group":
    end_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aborted(ending: str) -> bool:
    """One two-rank run: True if either rank exited with a status other than 0."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    processes = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), ending], env=env, stderr=subprocess.DEVNULL) for rank in (0, 1)]
    statuses = [process.wait(timeout=300) for process in processes]  # both, even when one aborted
    return any(status != 0 for status in statuses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="two-rank runs per ending")
    parser.add_argument("--endings", nargs="+", choices=ENDINGS, default=ENDINGS)
    args = parser.parse_args()
    print("| ending | runs | aborted |\n|---|---:|---:|")
    for ending in args.endings:
        print(f"| {ending} | {args.runs} | {sum(aborted(ending) for _ in range(args.runs))} |", flush=True)


if __name__ == "__main__":
    main()
