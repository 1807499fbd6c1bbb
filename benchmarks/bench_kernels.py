"""Benchmark generated low-bit kernels against torch fp32 nn.Linear and torch dynamic int8 (fbgemm).

Run (not collected by pytest):
    python benchmarks/bench_kernels.py            # full table, writes benchmarks/KERNELS.md
    python benchmarks/bench_kernels.py --quick    # fewer shapes and reps

Shapes come from Whisper tiny/base/small (d = 384/512/768): attention d x d, FFN 4d x d and d x 4d,
vocab projection 51865 x d; M = 1 (decoder step, matrix-vector) and M = 1500 (encoder frames).
"Cache" rows reuse one weight copy; "DRAM" rows rotate through enough copies to exceed 3x L3.
All methods run with the same thread count (2) in the same process; every time is a median.
"""
from __future__ import annotations

import os

# On a shared, oversubscribed machine libgomp's default spin-then-sleep wait policy makes every 2-thread
# call (torch's and ours alike: they share one OpenMP runtime) wait ~12 ms for a descheduled worker.
# Passive waiting avoids that; it must be set before torch loads libgomp and applies to all methods.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import argparse
import datetime
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from fxquant.codegen import compile_op
from fxquant.codegen.kernels import LinearKernel
from fxquant.ops import LowbitLinear
from fxquant.qweight import QuantizedWeight

THREADS = 2
L3_BYTES = 32 << 20
ROTATE_BYTES = 3 * L3_BYTES
OUT = Path(__file__).with_name("KERNELS.md")


def interleaved_medians(methods: dict, reps: int) -> dict[str, float]:
    """methods: name -> (fn(i), copies). One sample = one timed call; samples are taken round-robin
    across methods (so load from other processes hits every method alike) and rotate through the
    weight copies. Returns the median us per call of each method."""
    for fn, copies in methods.values():
        for i in range(copies):
            fn(i)  # warm up (and page in every copy)
    samples: dict[str, list[float]] = {name: [] for name in methods}
    clock = time.perf_counter
    for r in range(reps):
        for name, (fn, copies) in methods.items():
            i = r % copies
            t0 = clock()
            fn(i)
            samples[name].append(clock() - t0)
    return {name: statistics.median(v) * 1e6 for name, v in samples.items()}


def make_int8(lin: torch.nn.Linear) -> torch.nn.Module:
    torch.backends.quantized.engine = "fbgemm"
    return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)


def lowbit_copies(kernel: LinearKernel, copies: int) -> list[LinearKernel]:
    """Same compiled code, independent packed weight blobs (so rotation really streams DRAM)."""
    clone = lambda p: type(p)(*[None if t is None else t.clone() for t in p.tensors()])
    return [kernel] + [kernel.with_weights(clone(kernel.packed)) for _ in range(copies - 1)]


def bench_shape(n: int, k: int, m: int, resident: str, bits_list, reps: int) -> dict:
    """Median us of fp32 / int8 / W{bits}A8 for one [n, k] weight and m activation rows."""
    gen = torch.Generator().manual_seed(n * 7 + k)
    x = torch.randn(m, k, generator=gen)

    def copies_for(nbytes: int) -> int:
        return 1 if resident == "cache" else max(2, math.ceil(ROTATE_BYTES / nbytes))

    def linear() -> torch.nn.Linear:
        lin = torch.nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.normal_(0.0, k ** -0.5, generator=gen)
        return lin

    row: dict = {"fp32_bytes": n * k * 4, "int8_bytes": n * k}
    fp = [linear() for _ in range(copies_for(n * k * 4))]
    q8 = [make_int8(linear()) for _ in range(copies_for(n * k))]
    methods = {"fp32": (lambda i: fp[i](x), len(fp)), "int8": (lambda i: q8[i](x), len(q8))}
    for bits in bits_list:
        qw = QuantizedWeight.uniform_symmetric(fp[0].weight, bits=bits, group_size=64)
        kern = compile_op(LowbitLinear(qw, fp[0].bias), "native")
        row[f"w{bits}_bytes"] = kern.weight_bytes()
        ks = lowbit_copies(kern, copies_for(kern.weight_bytes()))
        methods[f"w{bits}"] = ((lambda ks: lambda i: ks[i](x))(ks), len(ks))
    with torch.inference_mode():
        row.update(interleaved_medians(methods, reps))
    return row


def goals_table(mv_raw: list[dict], mm_raw: list[dict]) -> str:
    """min / median / max of each goal's metric and how many shapes reach it."""
    goals = [
        ("M=1 DRAM: W4 >= 1.6x int8", [r["int8"] / r["w4"] for r in mv_raw], 1.6),
        ("M=1 DRAM: W4 >= 7x fp32", [r["fp32"] / r["w4"] for r in mv_raw], 7.0),
        ("M=1 DRAM: W3 >= 1.3x int8", [r["int8"] / r["w3"] for r in mv_raw], 1.3),
        ("M=1 DRAM: W2 >= 2.7x int8", [r["int8"] / r["w2"] for r in mv_raw], 2.7),
        ("M=1 DRAM: W2 >= 24 GB/s packed (80% of 30)", [r["w2_bytes"] / r["w2"] / 1e3 for r in mv_raw], 24.0),
        ("M=1500: W4A8 >= 1.0x int8", [r["int8"] / r["w4"] for r in mm_raw], 1.0),
    ]
    rows = [[name, f"{min(v):.2f}", f"{statistics.median(v):.2f}", f"{max(v):.2f}",
             f"{sum(x >= goal for x in v)}/{len(v)}"] for name, v, goal in goals if v]
    return tabulate(rows, ["goal", "min", "median", "max", "shapes reaching it"], tablefmt="github")


def machine_info() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    except OSError:
        model = platform.processor()
    from fxquant.codegen.targets import host_cpu_flags
    flags = sorted(f for f in host_cpu_flags() if f.startswith(("avx", "fma")))
    return (f"- CPU: {model}, {THREADS} threads (torch.set_num_threads({THREADS})), L3 {L3_BYTES >> 20} MiB\n"
            f"- ISA flags: {' '.join(flags)}\n- OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (all methods), "
            f"load average (1 min) when written: {os.getloadavg()[0]:.1f} (machine shared with other jobs)\n- torch {torch.__version__}, Python {platform.python_version()}, "
            f"date {datetime.date.today()}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/KERNELS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    reps = 101 if args.quick else 401
    models = {"tiny": 384, "base": 512, "small": 768}
    if args.quick:
        models = {"base": 512}
    bits_list = (4, 3, 2)
    mv_rows, mm_rows, mv_raw, mm_raw = [], [], [], []
    for model, d in models.items():
        shapes = [("attn", d, d), ("fc1", 4 * d, d), ("fc2", d, 4 * d), ("vocab", 51865, d)]
        for layer, n, k in shapes:
            for resident in ("cache", "DRAM"):
                if layer == "vocab" and resident == "cache":
                    continue
                r = bench_shape(n, k, 1, resident, bits_list, reps)
                if resident == "DRAM":
                    mv_raw.append(r)
                mv_rows.append([model, layer, f"{n}x{k}", resident, f"{r['fp32']:.1f}", f"{r['int8']:.1f}",
                                *[f"{r[f'w{b}']:.1f}" for b in bits_list],
                                f"{r['w4_bytes'] / r['w4'] / 1e3:.1f}", f"{r['w2_bytes'] / r['w2'] / 1e3:.1f}",
                                f"{r['int8_bytes'] / r['int8'] / 1e3:.1f}",
                                *[f"{r['int8'] / r[f'w{b}']:.2f}" for b in bits_list], f"{r['fp32'] / r['w4']:.1f}"])
                print(tabulate([mv_rows[-1]]), flush=True)
            if layer != "vocab":
                r = bench_shape(n, k, 1500, "cache", (4,), 9 if args.quick else 21)
                mm_raw.append(r)
                macs = 1500 * n * k
                mm_rows.append([model, layer, f"{n}x{k}", f"{r['fp32']:.0f}", f"{r['int8']:.0f}", f"{r['w4']:.0f}",
                                f"{macs / r['int8'] / 1e3:.0f}", f"{macs / r['w4'] / 1e3:.0f}",
                                f"{r['int8'] / r['w4']:.2f}", f"{r['fp32'] / r['w4']:.2f}",
                                f"{r['w4_bytes'] / r['int8_bytes']:.2f}"])
                print(tabulate([mm_rows[-1]]), flush=True)
    mv_head = ["model", "layer", "NxK", "weights", "fp32 us", "int8 us", "W4 us", "W3 us", "W2 us",
               "W4 GB/s", "W2 GB/s", "int8 GB/s", "W4/int8", "W3/int8", "W2/int8", "W4/fp32"]
    mm_head = ["model", "layer", "NxK", "fp32 us", "int8 us", "W4A8 us", "int8 GMAC/s", "W4A8 GMAC/s",
               "W4/int8", "W4/fp32", "W4 bytes/int8 bytes"]
    text = ("# Kernel benchmarks\n\n" + machine_info() +
            f"\nCommand: `python benchmarks/bench_kernels.py{' --quick' if args.quick else ''}`. "
            "Medians; ratios = time(baseline) / time(ours) (higher is better). W{b} = {b}-bit symmetric, "
            "group 64, int8 dynamic activations (W{b}A8), generated `native` kernels; int8 = "
            "torch.ao quantize_dynamic (fbgemm); GB/s counts each method's own weight bytes (ours: packed "
            "codes + scales).\n\n## Matrix-vector (M = 1)\n\n" + tabulate(mv_rows, mv_head, tablefmt="github") +
            "\n\n## Matrix-matrix (M = 1500, encoder)\n\n" + tabulate(mm_rows, mm_head, tablefmt="github") +
            "\n\n## Goals (over the rows above)\n\n" + goals_table(mv_raw, mm_raw) + "\n")
    print(text)
    if not args.no_write:
        OUT.write_text(text)
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
