"""The shared thread pool library is loaded before any codegen test: it is process-wide, so tests that count
compiler runs in a private cache directory never see it built there. (The tests' kernels are compiled in the
background while the other tests run: tests/codegen/prebuild.py, started by tests/conftest.py.)"""
from __future__ import annotations

import pytest

from fxquant.codegen import threadpool


@pytest.fixture(scope="session", autouse=True)
def _pool_library_first():
    threadpool.pool_library()
