"""toklip's own process-group logic. FSDP2 ranks start from one model. A run's process group ends with every
rank: each waits for the last, the group goes, gloo's threads get a pause; never on an error."""

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.tensor import DTensor

from toklip.cli import tool
from toklip.distributed import GLOO_GRACE_SECONDS, end_process_group
from toklip.training.strategies import shard_with_fsdp2


def _shard_a_model_of_its_own(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # no common seed: each rank builds different weights
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    model.register_buffer("steps", torch.tensor([10 + rank]))
    with torch.no_grad():
        for norm in model[1].parameters():
            norm.uniform_()  # LayerNorm starts at ones and zeros on every rank
    built = {name: value.clone() for name, value in model.state_dict().items()}
    mesh = dist.device_mesh.init_device_mesh("cpu", (2,))
    for _ in range(2):  # as Lightning's configure_model, once for each fit, validate or test: the second leaves it
        shard_with_fsdp2(model, [model[0]], mesh, ignored_params={model[2].bias})
    sharded = {name: value.full_tensor() if isinstance(value, DTensor) else value for name, value in model.state_dict().items()}
    report = {name: {"built": built[name].tolist(), "sharded": sharded[name].tolist()} for name in built}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    end_process_group()


def test_fsdp2_ranks_built_without_a_common_seed_all_shard_the_first_ranks_model_once(tmp_path, free_port):
    mp.spawn(_shard_a_model_of_its_own, args=(free_port, str(tmp_path)), nprocs=2, join=True)
    first, second = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert set(first) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias", "steps"}
    assert [name for name in first if first[name]["built"] == second[name]["built"]] == []
    # the block's weights, the root's own, the replicated (ignored) bias and the buffer: all rank 0's
    assert [name for name in first if not first[name]["sharded"] == second[name]["sharded"] == first[name]["built"]] == []


def _end_late(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    time.sleep(1.0 if rank == 1 else 0.0)  # rank 1 finishes its work a second after rank 0
    start = time.monotonic()
    end_process_group()
    report = {"waited": time.monotonic() - start, "alive": dist.is_initialized()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


def test_each_rank_waits_for_the_last_then_the_group_is_destroyed(tmp_path, free_port):
    mp.spawn(_end_late, args=(free_port, str(tmp_path)), nprocs=2, join=True)
    first, last = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert first["waited"] > 0.8 and last["waited"] < 0.5, (first, last)  # rank 0 left only when rank 1 came
    assert last["waited"] >= GLOO_GRACE_SECONDS  # and even the last pauses for gloo's threads to free their tensors
    assert not first["alive"] and not last["alive"]


@pytest.fixture
def group_of_one(free_port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_tool_ends_the_process_group_when_its_task_succeeds(group_of_one):
    assert tool("train")(lambda cfg: "done")(OmegaConf.create({})) == "done"
    assert not dist.is_initialized()


def test_a_tool_whose_task_fails_leaves_the_process_group_alone(group_of_one):
    """On an error path the other ranks may never reach a barrier: waiting for them would hang the failure."""

    def fail(cfg):
        raise RuntimeError("the task failed")

    with pytest.raises(RuntimeError, match="the task failed"):
        tool("train")(fail)(OmegaConf.create({}))
    assert dist.is_initialized()
