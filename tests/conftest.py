"""Shared fixtures: seeded RNG, the ../shared locator, small models used by several tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """../shared beside the repo (or $FXQUANT_SHARED); None when absent."""
    path = Path(os.environ.get("FXQUANT_SHARED", REPO.parent / "shared"))
    return path if path.is_dir() else None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared() -> Path:
    path = shared_dir()
    if path is None:
        pytest.skip("../shared (data and pretrained weights) is not present beside the repository")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of many small ops (fast and predictable on a shared machine).

    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
