"""Benchmark the generated attention kernel against torch SDPA at Whisper decode shapes (batch 1, Lq = 1).

Run (not collected by pytest):
    python benchmarks/bench_attention.py            # 2 threads: a table with OMP_WAIT_POLICY=passive, then active
    python benchmarks/bench_attention.py --one      # only the policy of the environment (default passive)

Rows: cross-attention (Lk = 1500 encoder frames, no mask) and self-attention over the 448-slot decoder
cache with an additive mask that is -inf beyond the current offset (10, 50, 200 filled slots), for
tiny (H = 6) and base (H = 8), D = 64. The cache is laid out as Whisper's: a [B, 448, H, D] buffer viewed
as [B, H, 448, D] (strided, never copied). Samples are taken round-robin across the methods.
The OpenMP wait policy decides whether a second thread pays off (waking a sleeping worker costs tens of
us on this VM), so the tables are printed for passive waiting and again for spinning (active) workers.

A second table puts the int8 key / value kernel (kv_dtype="int8", per-row scales from
quantize_activation_per_row) next to float32 for the cross-attention shapes, with K / V cache-resident and
with caches evicted before every call (a 64 MB buffer is read, untimed, before each call: in a real decode
step the 18 MB of float32 cross K / V plus the weights overflow the 32 MB L3). int8 comes in two layouts:
quantized from the strided [B, Lk, H, D] view as it is, and quantized from a contiguous [B, H, Lk, D] copy.
"""
from __future__ import annotations

import os

# Passive OpenMP waiting (as bench_kernels.py): on a shared machine a spinning-then-sleeping worker costs
# milliseconds per call; must be set before torch loads libgomp, and applies to torch and us alike.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from fxquant.codegen.attention import attention_kernel
from fxquant.qweight import quantize_activation_per_row

THREADS = 2
CTX = 448
EVICT_BYTES = 64 << 20


def operands(h: int, lk: int, offset: int | None, d: int = 64):
    """q [1, H, 1, D]; key / value [1, H, Lk, D] views of [1, Lk, H, D]; mask None or [1, Lk] (-inf tail)."""
    gen = torch.Generator().manual_seed(h * 1000 + lk)
    q = torch.randn(1, 1, h, d, generator=gen).transpose(1, 2)
    k, v = (torch.randn(1, lk, h, d, generator=gen).transpose(1, 2) for _ in range(2))
    mask = None
    if offset is not None:
        mask = torch.zeros(1, lk)
        mask[:, offset:] = float("-inf")
    return q, k, v, mask


def medians(methods: dict, reps: int, before=None) -> dict[str, float]:
    """Median us per call of each method (interleaved samples, after a warm-up); before() runs untimed
    ahead of every call."""
    for fn in methods.values():
        for _ in range(5):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in methods}
    clock = time.perf_counter
    for _ in range(reps):
        for name, fn in methods.items():
            if before is not None:
                before()
            t0 = clock()
            fn()
            samples[name].append(clock() - t0)
    return {name: statistics.median(v) * 1e6 for name, v in samples.items()}


def int8_rows(reps: int, evict_reps: int) -> list[list]:
    """Cross-attention (Lk = 1500, no mask): torch and our float32 kernel vs the int8 kernel, with K / V
    cache-resident and evicted before each call."""
    kern, kern8 = attention_kernel(64, "native"), attention_kernel(64, "native", kv_dtype="int8")
    junk = torch.ones(EVICT_BYTES // 4)
    rows = []
    for model, h in (("tiny", 6), ("base", 8)):
        q, k, v, _ = operands(h, 1500, None)
        (kq, ks), (vq, vs) = quantize_activation_per_row(k), quantize_activation_per_row(v)  # strided as k, v
        (kc, ksc), (vc, vsc) = quantize_activation_per_row(k.contiguous()), quantize_activation_per_row(v.contiguous())
        ref = F.scaled_dot_product_attention(q, kq.float() * ks, vq.float() * vs)
        err = (kern8(q, kq, vq, key_scale=ks, value_scale=vs) - ref).abs().max().item()
        methods = {"torch": lambda: F.scaled_dot_product_attention(q, k, v), "fp32": lambda: kern(q, k, v),
                   "int8": lambda: kern8(q, kq, vq, key_scale=ks, value_scale=vs),
                   "int8 contiguous": lambda: kern8(q, kc, vc, key_scale=ksc, value_scale=vsc)}
        for state, n, before in (("resident", reps, None), ("evicted", evict_reps, junk.sum)):
            t = medians(methods, n, before)
            rows.append([model, h, state, *(f"{t[m]:.1f}" for m in methods),
                         f"{t['fp32'] / t['int8']:.1f}x / {t['fp32'] / t['int8 contiguous']:.1f}x", f"{err:.1e}"])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=401, help="timed calls per method and shape")
    ap.add_argument("--evict-reps", type=int, default=101, help="timed calls per method with caches evicted")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--one", action="store_true", help="do not re-run with OMP_WAIT_POLICY=active")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kern = attention_kernel(64, "native")
    cases = [("tiny", 6, 1500, None), *[("tiny", 6, CTX, o) for o in (10, 50, 200)],
             ("base", 8, 1500, None), *[("base", 8, CTX, o) for o in (10, 50, 200)]]
    rows = []
    with torch.inference_mode():
        for model, h, lk, offset in cases:
            q, k, v, mask = operands(h, lk, offset)
            err = (kern(q, k, v, mask) - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max().item()
            t = medians({"torch": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                         "ours": lambda: kern(q, k, v, mask)}, args.reps)
            what = "cross, no mask" if offset is None else f"self, offset {offset}"
            rows.append([model, h, lk, what, f"{t['torch']:.1f}", f"{t['ours']:.1f}", f"{t['torch'] / t['ours']:.1f}x",
                         f"{err:.1e}"])
    print(f"\n{kern.name} ({kern.target.name}), {args.threads} threads, B=1 Lq=1 D=64, median us of {args.reps} "
          f"calls, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(tabulate(rows, ["model", "H", "Lk", "attention", "torch SDPA us", "fxquant us", "speed-up", "max |err|"],
                   tablefmt="github"))
    with torch.inference_mode():
        rows = int8_rows(args.reps, args.evict_reps)
    print(f"\ncross-attention Lk=1500, float32 vs int8 K/V ({attention_kernel(64, 'native', kv_dtype='int8').name}), "
          f"median us; evicted: {EVICT_BYTES >> 20} MB read before each call ({args.evict_reps} calls)")
    print(tabulate(rows, ["model", "H", "K/V", "torch SDPA fp32", "fxquant fp32", "fxquant int8",
                          "int8 [B,H,Lk,D] copy", "int8 / copy vs fp32", "max |err| int8"], tablefmt="github"))
    if not args.one:
        sys.stdout.flush()
        env = {**os.environ, "OMP_WAIT_POLICY": "active"}
        cmd = [sys.executable, __file__, "--one", "--reps", str(args.reps), "--threads", str(args.threads),
               "--evict-reps", str(args.evict_reps)]
        return subprocess.run(cmd, env=env).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
