"""Compile the test kernels concurrently once per session (gcc runs in subprocesses, so threads
overlap them); the tests then hit the content-hash cache. Cuts a cold run roughly by the core count.
The thread pool library is loaded first: it is process-wide, so tests that count compiler runs in a
private cache directory never see it built there."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from fxquant.codegen import TARGETS, compile_op, threadpool


@pytest.fixture(scope="session", autouse=True)
def _precompile_kernels():
    threadpool.pool_library()
    from . import test_conv_attach as tc
    from . import test_linear as tl
    from .codegen_cases import make_linear

    jobs = [("avx512", c) for c in tl.AVX512_CASES if "avx512" in tl.RUNNABLE]
    jobs += [("portable", c) for c in tl.PORTABLE_CASES]
    jobs += [("avx2", c) for c in tl.PORTABLE_CASES[:3] + tl.PORTABLE_CASES[-2:] if "avx2" in tl.RUNNABLE]
    large_m = [(40, 64, 4, 64, "sym", True, "gelu", 8), (13, 100, 2, None, "asym", False, None, 8),
               (19, 64, 3, 32, "row_cb", True, None, None)]
    exact = [(37, 100, 4, g, f, False, None, 8) for f in ("sym", "asym", "row_cb") for g in (32, None)]
    jobs += [(t, c) for t in tl.RUNNABLE for c in large_m + exact]
    jobs += [(t, ("conv", c)) for t in tc.RUNNABLE for c in tc.CONVS]

    def build(job):
        target, case = job
        try:
            if case[0] == "conv":
                op = tc.make_conv(*case[1][:-1])
            else:
                n, k, bits, group, fmt, bias, epi, act = case
                op = make_linear(n, k, bits, group, fmt, bias, epi, act, pow2_scales=case in exact)
            compile_op(op, TARGETS[target])
        except Exception:  # the test itself reports the failure with context
            pass

    with ThreadPoolExecutor(max_workers=max(2, (os.cpu_count() or 2) + 1)) as pool:
        list(pool.map(build, jobs))
    yield
