"""The one thread pool every generated kernel runs its parallel loops on (codegen/templates/threadpool.c.j2).

Kernels no longer use OpenMP: each kernel library exports `fx_bind_runtime`, and `load_kernel_library`
hands it this pool's function table right after loading. The pool is compiled once through the build
cache and shared by every kernel of the process. A job is many small chunks claimed from an atomic
counter; the calling thread always works, helpers sleep on a futex after a short bounded spin, and a
job whose caller had to wait for a descheduled helper turns the pool off for a back-off period, so a
busy machine costs a kernel about what it costs one thread.

Thread count per call: `torch.get_num_threads()` (so `torch.set_num_threads` and OMP_NUM_THREADS apply
to fxquant and torch alike), unless `kernel_threads(n)` sets it for the calling thread (e.g. torch's own ops
on one thread, without OpenMP's spinning workers, while the kernels use two); each kernel lowers it for
small work and each call site measures whether its parallel runs pay off. Wait policy: OMP_WAIT_POLICY=passive
means helpers sleep at once, active spins 2 ms, unset spins DEFAULT_SPIN_US; FXQUANT_SPIN_US overrides.

Example:
    >>> from fxquant.codegen import threadpool
    >>> threadpool.wait_policy({"OMP_WAIT_POLICY": "passive"})
    ('passive', 0)
    >>> with threadpool.kernel_threads(2):
    ...     threadpool.num_threads()
    2
    >>> stats = threadpool.pool_stats()            # doctest: +SKIP
    >>> sorted(stats)[:3]                          # doctest: +SKIP
    ['caller_chunks', 'helper_chunks', 'helpers']
"""
from __future__ import annotations

import ctypes
import os
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch

from fxquant.errors import FxQuantError

from .build import BuildError, build_library
from .render import render

RUNTIME_ABI = 2  # must match FX_RUNTIME_ABI in templates/_runtime.c.j2 and threadpool.c.j2
DEFAULT_SPIN_US = 50      # idle helpers poll this long before sleeping (between back-to-back decode kernels)
ACTIVE_SPIN_US = 2000     # OMP_WAIT_POLICY=active
POOL_FLAGS = ("-O2", "-fPIC", "-shared", "-pthread", "-std=gnu11")
STAT_NAMES = ("jobs", "serial_busy", "serial_solo", "caller_chunks", "helper_chunks", "stalls", "wait_ns",
              "sleeps", "serial_faster", "helpers", "solo_now")

_LOCK = threading.Lock()
_POOL: dict[str, object] = {}
_LOCAL = threading.local()  # .n: this thread's kernel_threads override


class ThreadPoolError(FxQuantError):
    """A kernel library does not speak this pool's runtime ABI (stale cache entry or foreign library)."""


def num_threads() -> int:
    """Threads a kernel called now by this thread may use: its kernel_threads() override, else torch's."""
    n = getattr(_LOCAL, "n", None)
    return torch.get_num_threads() if n is None else n


@contextmanager
def kernel_threads(n: int) -> Iterator[None]:
    """Kernels this thread calls inside the block use up to n threads, whatever torch.get_num_threads()."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ThreadPoolError(f"kernel_threads needs a positive int, got {n!r}")
    old = getattr(_LOCAL, "n", None)
    _LOCAL.n = n
    try:
        yield
    finally:
        _LOCAL.n = old


@contextmanager
def pool_owns_threads() -> Iterator[None]:
    """Inside the block torch's own ops run on one thread (no OpenMP workers to spin, or to wait for when one
    has lost its core) while fxquant's kernels keep the thread count: what a compiled model can run under on
    a busy machine. Costs ~1 us per use."""
    n, old = num_threads(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with kernel_threads(n):
            yield
    finally:
        torch.set_num_threads(old)


def wait_policy(env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """(policy name, helper spin in us) from FXQUANT_SPIN_US / OMP_WAIT_POLICY; the same rule torch's
    OpenMP follows, so fxquant and torch wait alike."""
    env = os.environ if env is None else env
    raw = env.get("FXQUANT_SPIN_US", "").strip()
    if raw:
        try:
            us = int(raw)
        except ValueError:
            raise ThreadPoolError(
                f"FXQUANT_SPIN_US must be a whole number of microseconds, got {raw!r}"
            ) from None
        if us < 0:
            raise ThreadPoolError(f"FXQUANT_SPIN_US must be >= 0, got {us}")
        return f"spin {us} us", us
    policy = env.get("OMP_WAIT_POLICY", "").strip().lower()
    if policy == "passive":
        return "passive", 0
    if policy == "active":
        return "active", ACTIVE_SPIN_US
    return "default", DEFAULT_SPIN_US


def _load_pool() -> ctypes.CDLL:
    src = render("threadpool.c.j2", default_spin_us=DEFAULT_SPIN_US)
    lib = build_library(src, "fx_threadpool", POOL_FLAGS)
    lib.fx_pool_runtime.restype = ctypes.c_void_p
    lib.fx_pool_runtime.argtypes = []
    lib.fx_pool_configure.restype = None
    lib.fx_pool_configure.argtypes = [ctypes.c_int64] * 6
    lib.fx_pool_stats.restype = ctypes.c_int
    lib.fx_pool_stats.argtypes = [ctypes.c_void_p]
    lib.fx_pool_configure(wait_policy()[1] * 1000, -1, -1, -1, -1, -1)
    return lib


def pool_library() -> ctypes.CDLL | None:
    """The loaded pool library (compiled on first use); None when it cannot be built (kernels then run
    on the calling thread only, with a warning)."""
    with _LOCK:
        if "lib" not in _POOL:
            try:
                _POOL["lib"] = _load_pool()
            except (BuildError, OSError, AttributeError) as e:
                warnings.warn(f"fxquant thread pool unavailable, kernels run single-threaded: {e}")
                _POOL["lib"] = None
        return _POOL["lib"]  # type: ignore[return-value]


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Hand the pool's function table to a kernel library (idempotent)."""
    pool = pool_library()
    if pool is None:
        return lib
    fn = lib.fx_bind_runtime
    fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int
    if fn(pool.fx_pool_runtime()) != 0:
        raise ThreadPoolError(
            f"kernel library {lib._name} does not accept runtime ABI {RUNTIME_ABI}; delete it "
            "from the kernel cache (FXQUANT_CACHE_DIR) so that it is rebuilt"
        )
    return lib


def load_kernel_library(
    source: str, name: str, flags: tuple[str, ...], cache: str | None = None
) -> ctypes.CDLL:
    """build_library (content-hash cache) + bind to the shared pool: how every kernel library is loaded."""
    return bind(build_library(source, name, flags, cache))


def configure(
    spin_us: int | None = None,
    caller_spin_us: int | None = None,
    stall_us: int | None = None,
    backoff_ms: tuple[int, int] | None = None,
    measure: bool | None = None,
) -> None:
    """Tune the pool (None keeps a setting): helper spin before sleeping, caller spin before sleeping,
    the wait beyond 4 chunks that counts as a stall, the (min, max) solo back-off after a stall, and
    whether each call site measures serial against parallel and uses the faster (False: always parallel;
    setting it forgets what was measured)."""
    lib = pool_library()
    if lib is None:
        return

    def ns(us):
        return -1 if us is None else int(us) * 1000

    lo, hi = (-1, -1) if backoff_ms is None else (int(backoff_ms[0]) * 10**6, int(backoff_ms[1]) * 10**6)
    lib.fx_pool_configure(
        ns(spin_us), ns(caller_spin_us), ns(stall_us), lo, hi, -1 if measure is None else int(measure)
    )


def pool_stats() -> dict[str, int]:
    """Cumulative counters: jobs run in parallel, jobs run serially because the pool was busy (another
    thread) or in a solo back-off, chunks run by the caller / helpers, stalls, caller wait, helper sleeps,
    jobs run serially because that call site measured serial faster, helper threads and whether a
    back-off is on now."""
    lib = pool_library()
    if lib is None:
        return {k: 0 for k in STAT_NAMES}
    buf = (ctypes.c_int64 * 16)()
    n = lib.fx_pool_stats(ctypes.addressof(buf))
    return dict(zip(STAT_NAMES, list(buf)[:n]))
