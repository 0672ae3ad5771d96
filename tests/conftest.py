import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable; nothing may download

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def free_port() -> int:
    """A loopback port for a test's own process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def run_on_two_ranks(tmp_path) -> Callable[[str], tuple[str, list]]:
    """Runs a script on two CPU ranks as its own program (Lightning's launchers re-launch it). The script
    builds the Trainer `t` and leaves each rank's `report` (JSON); returned: its stdout and the reports,
    each through a file of its own (two ranks' prints can interleave)."""

    def run(body: str) -> tuple[str, list]:
        script = tmp_path / "two_ranks.py"
        script.write_text(
            textwrap.dedent(body)
            + textwrap.dedent(f"""
            import json, pathlib
            from toklip.distributed import end_process_group
            pathlib.Path({str(tmp_path)!r}, f"report{{t.global_rank}}.json").write_text(json.dumps(report))
            end_process_group()  # as the tools end: else gloo can abort the exit after the last gather
            """)
        )
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout, [json.loads((tmp_path / f"report{rank}.json").read_text()) for rank in (0, 1)]

    return run


@pytest.fixture
def images():
    """A small batch of 64 px images in [-1, 1]."""
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


class _RunsACommand:
    """Unpickling this runs `touch marker`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def malicious_payload(tmp_path):
    """(an object whose unpickling runs a command, the file that command would create)."""
    marker = tmp_path / "payload-ran"
    return _RunsACommand(marker), marker


@pytest.fixture(scope="session")
def tiny_teacher_checkpoint(tmp_path_factory):
    """A random-init `tiny_teacher_64` open_clip model saved as safetensors (the teacher file format)."""
    from toklip.checkpoints import save_safetensors
    from toklip.models.teacher import build_open_clip

    torch.manual_seed(123)
    return save_safetensors(
        build_open_clip("tiny_teacher_64").state_dict(), tmp_path_factory.mktemp("teacher") / "tiny_teacher.safetensors"
    )


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    """A small synthetic-scene set: 256 training samples in 4 shards, 7 colour classes, 20 retrieval images."""
    from toklip.data import SyntheticConfig, make_synthetic

    config = SyntheticConfig(
        train_samples=256, samples_per_shard=64, zeroshot_classes=("colour",), zeroshot_per_class=3, retrieval_images=20
    )
    return make_synthetic(tmp_path_factory.mktemp("synthetic"), config)


@pytest.fixture(scope="session")
def frozen_parts(tmp_path_factory):
    """(tiny teacher file, tiny VQ file, the overrides naming both): a tiny run's frozen networks."""
    import toklip
    from toklip.checkpoints import save_safetensors
    from toklip.models.teacher import build_open_clip

    root = tmp_path_factory.mktemp("frozen")
    torch.manual_seed(123)
    teacher = save_safetensors(build_open_clip("tiny_teacher_64").state_dict(), root / "teacher.safetensors")
    vq = save_safetensors(toklip.build_tokenizer("llamagen_tiny").state_dict(), root / "vq.safetensors")
    return teacher, vq, (f"teacher.checkpoint={teacher}", f"tokenizer.checkpoint={vq}")
