"""The shared thread pool: every chunk runs once, the caller works too, helpers join, a stalled helper turns
the pool off for a while, concurrent callers, fork, and kernels that give the same bits at 1, 2 and 3
threads."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from fxquant.codegen import TARGETS, attention_kernel, compile_op, threadpool
from fxquant.codegen.build import build_library
from fxquant.codegen.render import environment

from .codegen_cases import assert_close, make_input, make_linear
from .test_conv_attach import make_conv

RUNNABLE = [t for t in ("avx512", "portable") if TARGETS[t].runnable()]
pytestmark = pytest.mark.usefixtures("kernel_prebuild_done")  # helpers' timings without background compilers

# a probe library on the kernels' own runtime code: chunk i records which thread ran it (0 = the caller)
PROBE = """{% include "_runtime.c.j2" %}
#include <pthread.h>
#include <unistd.h>
typedef struct { pthread_t caller; int32_t *who; int64_t caller_us, helper_us; } probe;
/* a chunk sleeps (rather than spins) so that a busy machine still lets the helper in */
static void task(void *ctx, int64_t c) {
    probe *p = ctx;
    int mine = pthread_equal(pthread_self(), p->caller);
    p->who[c] += mine ? 1 : 1000;
    usleep((useconds_t)(mine ? p->caller_us : p->helper_us));
}
void run(int32_t *who, int64_t n, int nt, int64_t caller_us, int64_t helper_us) {
    probe p = {pthread_self(), who, caller_us, helper_us};
    fx_parallel(task, &p, n, nt, n);
}
"""


@pytest.fixture(scope="module")
def probe():
    src = environment().from_string(PROBE).render()
    lib = threadpool.bind(
        build_library(src, "test_pool_probe", ("-O2", "-fPIC", "-shared", "-pthread", "-std=gnu11"))
    )
    lib.run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.run.restype = None

    def run(n: int, nt: int, caller_us: int = 0, helper_us: int = 0) -> list[int]:
        """chunk i -> 1 if the caller ran it, 1000 if a helper did; chunks last caller_us / helper_us"""
        who = (ctypes.c_int32 * n)()
        lib.run(ctypes.addressof(who), n, nt, caller_us, helper_us)
        return list(who)

    return run


@pytest.fixture
def no_solo():
    """Every job goes to the pool during the test: no solo back-off after a stall, no serial-is-faster choice
    (the machine may be busy)."""
    threadpool.configure(stall_us=10**9, backoff_ms=(0, 0), measure=False)
    yield
    threadpool.configure(stall_us=200, backoff_ms=(20, 1000), measure=True)


def _delta(before: dict) -> dict:
    after = threadpool.pool_stats()
    return {k: after[k] - before[k] for k in before}


def test_every_chunk_runs_exactly_once_and_helpers_join(probe, no_solo):
    before = threadpool.pool_stats()
    who = probe(40, nt=2, caller_us=300, helper_us=300)
    assert all(w in (1, 1000) for w in who), who  # once each, by the caller or a helper
    assert who.count(1) >= 1  # the caller always works
    assert who.count(1000) >= 1  # 12 ms of work: the helper woke up and took some
    d = _delta(before)
    assert d["jobs"] == 1 and d["caller_chunks"] + d["helper_chunks"] == 40
    assert threadpool.pool_stats()["helpers"] >= 1


def test_one_thread_runs_on_the_caller_without_the_pool(probe):
    before = threadpool.pool_stats()
    assert probe(25, nt=1) == [1] * 25
    assert _delta(before)["jobs"] == 0


def test_a_stalled_helper_switches_to_solo_for_a_while(probe):
    threadpool.configure(stall_us=200, backoff_ms=(500, 1000))
    try:
        before = threadpool.pool_stats()
        # the caller's chunks take 300 us; a helper's chunk 40 ms (a helper that lost its core mid-chunk)
        who = probe(30, nt=2, caller_us=300, helper_us=40_000)
        assert all(w in (1, 1000) for w in who) and who.count(1000) >= 1
        d = _delta(before)
        assert d["stalls"] == 1 and d["wait_ns"] > 20_000_000
        assert threadpool.pool_stats()["solo_now"] == 1
        assert probe(30, nt=2) == [1] * 30  # back-off: the caller runs everything
        assert _delta(before)["serial_solo"] == 1
    finally:
        threadpool.configure(stall_us=200, backoff_ms=(20, 1000))


def test_a_call_site_where_serial_is_faster_runs_serially(probe):
    threadpool.configure(stall_us=10**9, backoff_ms=(0, 0), measure=True)
    try:
        before = threadpool.pool_stats()
        # serial: 10 chunks of 1 ms on the caller; parallel: a chunk a helper takes costs 30 ms
        outs = [probe(10, nt=2, caller_us=1000, helper_us=30_000) for _ in range(20)]
        assert all(all(w in (1, 1000) for w in who) for who in outs)
        d = _delta(before)
        # parallel is measured first, then re-measured only after 16x its cost (~0.5 s) while it keeps losing
        assert d["serial_faster"] >= 17 and 1 <= d["jobs"] <= 3, d
    finally:
        threadpool.configure(stall_us=200, backoff_ms=(20, 1000), measure=True)


def test_a_second_caller_runs_its_own_loop_while_the_pool_is_busy(probe, no_solo):
    before = threadpool.pool_stats()
    with ThreadPoolExecutor(2) as ex:
        outs = list(ex.map(lambda _: probe(20, nt=2, caller_us=500, helper_us=500), range(6)))
    assert all(all(w in (1, 1000) for w in who) for who in outs)
    d = _delta(before)
    assert d["jobs"] + d["serial_busy"] == 6


def test_kernel_threads_overrides_torchs_count_for_this_thread_only(no_solo):
    k, x = compile_op(make_linear(1024, 1024, 4, 64), "native"), make_input(64, 1024)
    before = threadpool.pool_stats()
    with threadpool.kernel_threads(1):
        _at_threads(lambda: k(x), 2)  # torch says 2, the kernels use 1
    assert _delta(before)["jobs"] == 0
    with threadpool.kernel_threads(2):
        assert threadpool.num_threads() == 2
        _at_threads(lambda: k(x), 1)  # torch's ops on one thread, the kernels on two
        with ThreadPoolExecutor(1) as ex:  # another thread keeps torch's count
            assert ex.submit(threadpool.num_threads).result() == torch.get_num_threads()
    assert _delta(before)["jobs"] == 1
    assert threadpool.num_threads() == torch.get_num_threads()
    with pytest.raises(threadpool.ThreadPoolError, match="positive int"):
        with threadpool.kernel_threads(0):
            pass


def test_pool_owns_threads_runs_torch_on_one_thread_and_kernels_on_torchs_count(no_solo):
    k, x = compile_op(make_linear(1024, 1024, 4, 64), "native"), make_input(64, 1024)

    def inside():
        with threadpool.pool_owns_threads():
            seen = torch.get_num_threads(), threadpool.num_threads()
            before = threadpool.pool_stats()
            k(x)
            return seen, _delta(before)["jobs"]

    (torch_n, kernel_n), jobs = _at_threads(inside, 2)
    assert (torch_n, kernel_n, jobs) == (1, 2, 1)
    assert _at_threads(torch.get_num_threads, 2) == 2


def test_wait_policy_follows_omp_wait_policy_and_fxquant_spin_us():
    assert threadpool.wait_policy({}) == ("default", threadpool.DEFAULT_SPIN_US)
    assert threadpool.wait_policy({"OMP_WAIT_POLICY": "PASSIVE"}) == ("passive", 0)
    assert threadpool.wait_policy({"OMP_WAIT_POLICY": "active"}) == ("active", threadpool.ACTIVE_SPIN_US)
    assert threadpool.wait_policy({"OMP_WAIT_POLICY": "passive", "FXQUANT_SPIN_US": "7"}) == ("spin 7 us", 7)
    with pytest.raises(threadpool.ThreadPoolError, match="FXQUANT_SPIN_US must be a whole number"):
        threadpool.wait_policy({"FXQUANT_SPIN_US": "fast"})


def test_kernels_and_pool_speak_one_runtime_abi():
    from fxquant.codegen.render import TEMPLATES

    for name in ("_runtime.c.j2", "threadpool.c.j2"):
        assert f"#define FX_RUNTIME_ABI {threadpool.RUNTIME_ABI}\n" in (TEMPLATES / name).read_text(), name


def test_a_library_with_another_runtime_abi_is_refused():
    src = "int fx_bind_runtime(const void *rt) { (void)rt; return -1; }"
    lib = build_library(src, "test_pool_old_abi", ("-O2", "-fPIC", "-shared"))
    with pytest.raises(threadpool.ThreadPoolError, match="delete it from the kernel cache"):
        threadpool.bind(lib)


# ---- kernels: same bits at 1, 2 and 3 threads, and from two Python threads at once


def _at_threads(fn, threads: int):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


LINEAR_CASES = [  # (target, n, k, m, bits, fmt, act_bits, fuse LayerNorm + residual)
    ("avx512", 256, 512, 1, 4, "sym", 8, False),  # small decode GEMV: one thread by design
    ("avx512", 4096, 2048, 1, 4, "asym", 8, True),  # GEMV split over row blocks
    ("avx512", 640, 1024, 13, 4, "row_cb", 8, False),  # small-M matrix-vector path (8.5M MACs)
    ("avx512", 200, 384, 700, 8, "sym", 8, True),  # large M: prep chunks + tiles in one job
    ("portable", 96, 200, 300, 4, "asym", 8, True),
    ("portable", 96, 200, 300, 3, "row_cb", None, True),
]


def case_op(case):
    """(op of a LINEAR_CASES row, the generator for its residual: it drew the LayerNorm weights)."""
    _, n, k, m, bits, fmt, act, fused = case
    op, gen = make_linear(n, k, bits, 64, fmt, True, "gelu", act), torch.Generator().manual_seed(3)
    if fused:
        op.fuse_layer_norm(torch.rand(k, generator=gen) + 0.5, torch.randn(k, generator=gen), 1e-5)
        op.residual = True
    return op, gen


def depthwise_conv():
    return make_conv(64, 64, (9,), (1,), (4,), (1,), 8, None, "relu")


BIG = (1024, 1024, 4, 64, "sym", True, None, 8)  # the pool tests' kernel ("native")
WIDE = (512, 256, 8, 64, "asym", False, "relu", 8)


def kernel_jobs() -> list:
    """Zero-argument callables that build every kernel the tests here compile (tests/codegen/prebuild.py)."""
    jobs = [partial(compile_op, make_linear(*BIG), "native")]
    jobs += [lambda c=c: compile_op(case_op(c)[0], c[0]) for c in LINEAR_CASES if c[0] in RUNNABLE]
    for t in RUNNABLE:
        jobs += [lambda t=t: compile_op(depthwise_conv(), t), partial(attention_kernel, 64, t)]
        jobs += [lambda t=t, c=c: compile_op(make_linear(*c), t) for c in (BIG, WIDE)]
    return jobs


@pytest.mark.parametrize("case", [c for c in LINEAR_CASES if c[0] in RUNNABLE], ids=str)
def test_linear_kernels_give_the_same_bits_at_1_2_and_3_threads(case, no_solo):
    target, n, k, m, bits, fmt, act, fused = case
    op, gen = case_op(case)
    res = torch.randn(m, n, generator=gen) if fused else None
    kern = compile_op(op, target)
    x = make_input(m, k, seed=5)
    outs = [_at_threads(lambda: kern(x, residual=res) if fused else kern(x), t) for t in (1, 2, 3)]
    assert_close(outs[0], op.reference(x, res) if fused else op.reference(x), kern.name)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("target", RUNNABLE)
def test_grouped_conv_and_attention_give_the_same_bits_at_1_2_and_3_threads(target, no_solo):
    conv = depthwise_conv()
    ck = compile_op(conv, target)
    x = torch.randn(3, 64, 500)
    outs = [_at_threads(lambda: ck(x), t) for t in (1, 2, 3)]
    torch.testing.assert_close(outs[0], conv.reference(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    att = attention_kernel(64, target)
    q, kv = torch.randn(2, 6, 4, 64), torch.randn(2, 6, 1500, 64)
    outs = [_at_threads(lambda: att(q, kv, kv), t) for t in (1, 2, 3)]
    torch.testing.assert_close(outs[0], F.scaled_dot_product_attention(q, kv, kv), rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("target", RUNNABLE)
def test_kernels_called_from_two_python_threads_at_once(target, no_solo):
    big, wide = make_linear(*BIG), make_linear(*WIDE)
    kernels = [
        (compile_op(big, target), make_input(40, 1024, seed=1)),
        (compile_op(wide, target), make_input(200, 256, seed=2)),
    ]
    expected = [k(x) for k, x in kernels]
    before = threadpool.pool_stats()

    def hammer(i: int) -> bool:
        k, x = kernels[i % 2]
        return all(torch.equal(k(x), expected[i % 2]) for _ in range(15))

    with ThreadPoolExecutor(2) as ex:
        assert all(ex.map(hammer, range(4)))
    d = _delta(before)
    assert (
        d["jobs"] + d["serial_busy"] == 60
    )  # every call went to the pool or, while it was busy, ran serially


def test_omp_num_threads_one_keeps_the_pool_idle():
    code = (
        "import torch; from fxquant.codegen import compile_op, threadpool; "
        "from tests.codegen.codegen_cases import make_linear, make_input; "
        "k = compile_op(make_linear(1024, 1024, 4, 64), 'native'); k(make_input(64, 1024)); "
        "print(torch.get_num_threads(), threadpool.pool_stats()['jobs'])"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "0"]


def _child(conn, k, x):
    # bytes, not a tensor: sending a tensor would run torch's OpenMP, which hangs in a forked child
    conn.send(_at_threads(lambda: k(x), 2).numpy().tobytes())
    conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_restarts_its_helpers(no_solo):
    op = make_linear(1024, 1024, 4, 64, "sym", True, None, 8)
    k, x = compile_op(op, "native"), make_input(64, 1024)
    want = _at_threads(lambda: k(x), 2)  # helpers exist in the parent
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(child, k, x))
    p.start()
    got = parent.recv() if parent.poll(120) else None
    p.join(30)
    if p.exitcode is None:
        p.kill()
    assert p.exitcode == 0 and got == want.numpy().tobytes()
