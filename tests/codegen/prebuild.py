"""Build the codegen tests' kernels in a background process: a cold run compiles them while other tests run.

tests/conftest.py starts `python -m tests.codegen.prebuild MODULE...` (the tests/codegen modules that were
collected) as soon as collection ends, and runs tests/codegen last: the ~200 compiler runs of an empty kernel
cache then overlap tests/fxquant and tests/passes instead of adding to the codegen tests. Each test module
lists what it compiles in `kernel_jobs()`: zero-argument callables that each build one kernel (the same
`compile_op` / `attention_kernel` calls on the same ops as its tests). Jobs run on a few threads (the compiler
is a subprocess, so they overlap) and write to the session's kernel cache ($FXQUANT_CACHE_DIR, inherited).

Nothing depends on this process: a test that needs a kernel it is compiling waits for it (the per-key build
lock in fxquant.codegen.build), one it has not reached yet is compiled by the test itself; a job missing here
only costs time, and a failing one is reported here and left for its test to fail with context.

Example (what conftest runs for the whole directory; the summary of an empty cache on 2 busy cores):
    $ python -m tests.codegen.prebuild test_attention test_attention_prefill ... test_threadpool
    prebuild: 198 kernels (192 compiled, 3 cached) on 2 threads in 120.4 s, 0 failed
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable


def _conv_jobs() -> list[Callable]:
    """test_conv_attach's test_conv kernels (listed here while another work stream edits that file)."""
    from . import test_conv_attach as tc
    from fxquant.codegen import compile_op

    return [lambda t=t, c=c: compile_op(tc.make_conv(*c[:-1]), t) for t in tc.RUNNABLE for c in tc.CONVS]


def _conv1d_jobs() -> list[Callable]:
    """test_conv1d_columns' kernels: one per (cin, cout, kernel size) of its sweep (stride, padding and length
    do not change the source), plus its transposed-input and too-short-input convs."""
    from . import test_conv1d_columns as tc1
    from . import test_conv_attach as tc
    from fxquant.codegen import compile_op

    convs = sorted({(c, n, (k,), (1,), (0,), (1,), 1, 8, "gelu") for c, n, k, *_ in tc1.SWEEP})
    convs += [(16, 12, (3,), (2,), (1,), (1,), 1, act, None) for act in (8, None)]
    convs += [(4, 6, (5,), (1,), (1,), (1,), 1, 8, None)]
    return [lambda t=t, c=c: compile_op(tc.make_conv(*c), t) for t in tc1.RUNNABLE for c in convs]


# modules whose files another work stream edits: their kernels are listed here
EXTRA = {"test_conv_attach": _conv_jobs, "test_conv1d_columns": _conv1d_jobs}


def module_jobs(modules: list[str]) -> list[Callable]:
    """The kernel jobs of tests/codegen/<module>.py for each module name, in order (none for a module without
    `kernel_jobs`); an unknown module is an error."""
    jobs: list[Callable] = []
    for name in modules:
        mod = importlib.import_module(f"{__package__}.{name}")
        jobs += mod.kernel_jobs() if hasattr(mod, "kernel_jobs") else []
        jobs += EXTRA[name]() if name in EXTRA else []
    return jobs


def default_workers() -> int:
    """One compiler per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def run(jobs: list[Callable], workers: int, stop: threading.Event) -> list[str]:
    """Run the jobs on `workers` threads until done or `stop` is set; returns one line per failed job."""
    failed: list[str] = []

    def one(job: Callable) -> None:
        if stop.is_set():
            return
        try:
            job()
        except Exception as e:  # the test that needs this kernel reports it with context
            failed.append(f"{getattr(job, '__qualname__', job)}: {type(e).__name__}: {str(e)[:300]}")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, jobs))
    return failed


class Background:
    """This module run as a background process for a test session: started after collection, waited for by
    timing-sensitive tests, stopped (running compilers finish, nothing new starts) when the session ends."""

    def __init__(self, modules: list[str], cwd: Path):
        self.log = tempfile.TemporaryFile("w+")
        cmd = [sys.executable, "-m", __name__, *modules]
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 600.0) -> int | None:
        """The exit code once the process has finished, None if it is still running after `timeout` s."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            if self.wait(60) is None:  # a compiler hung: end the process group (it and its compilers)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def summary(self) -> str:
        """Its summary line, or the end of its output when it failed."""
        self.log.seek(0)
        lines = self.log.read().splitlines()
        rc = self.proc.poll()
        if rc == 0:
            return next((line for line in lines if line.startswith("prebuild:")), "prebuild: no summary")
        return f"prebuild exited with code {rc}:\n" + "\n".join(lines[-20:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.codegen.prebuild", description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", help="tests/codegen module names, e.g. test_linear")
    ap.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                    help="compilers at once (default: one per CPU)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    stop = threading.Event()
    # SIGTERM (the test session ended first): start no new job, let the running compilers finish and exit
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    import torch

    from fxquant.codegen import build

    torch.set_num_threads(1)  # packing small test weights: leave the CPUs to the compilers and the tests
    start = time.perf_counter()
    jobs = module_jobs(args.modules)
    failed = run(jobs, args.workers, stop)
    print(f"prebuild: {len(jobs)} kernels ({build.STATS['compiles']} compiled, {build.STATS['cache_hits']} "
          f"cached) on {args.workers} threads in {time.perf_counter() - start:.1f} s, {len(failed)} failed"
          + (" (stopped early)" if stop.is_set() else ""))
    for line in failed:
        print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
