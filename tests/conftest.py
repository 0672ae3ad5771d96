import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable; nothing may download

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
