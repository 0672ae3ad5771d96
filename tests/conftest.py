import os

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
