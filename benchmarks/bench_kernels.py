"""Fair kernel benchmark: torch fp32 nn.Linear, torch dynamic int8 and fxquant's compiled modules, one layer.

Run (not collected by pytest):
    python benchmarks/bench_kernels.py             # all shapes; 2 threads and 1; quiet and one core busy
    python benchmarks/bench_kernels.py --quick     # fewer shapes and rounds
    python benchmarks/bench_kernels.py --wait-policy passive --threads 2 --load quiet

Every method is called the way a user calls it: `nn.Linear` and `quantize_dynamic(...)` modules, and the
module `fxquant.compile_lowbit` returns (pipeline with `codegen{never_slower=false}`, so the kernel runs even
where torch would be faster); the "W4 kernel" column is the same kernel called raw (the module's Python cost is
the difference). All methods run at the same thread count (`torch.set_num_threads`, which fxquant's pool
follows) and wait policy, in interleaved rounds (benchmarks/harness.py), on a quiet machine and with one
busy-loop process; the load average of each block is recorded. The 4096x4096 rows rotate through enough
weight copies that every method streams its weights from DRAM (3x the 32 MiB L3); the Whisper-size rows
(d = 384) stay cache resident. Writes benchmarks/KERNELS.md and KERNELS.json.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and rounds")
    ap.add_argument("--threads", default="2,1", help="thread counts, e.g. 2,1 (default)")
    ap.add_argument("--load", default="quiet,busy", help="quiet, busy (one busy-loop process) or both (default)")
    ap.add_argument("--wait-policy", choices=["default", "passive", "active"], default="default",
                    help="OMP_WAIT_POLICY for torch and fxquant alike (default: leave unset)")
    ap.add_argument("--bits", default="4,8", help="fxquant weight bits (W{b}A8, group 64)")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 21, --quick 9)")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/KERNELS.md)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.wait_policy != "default":
    os.environ["OMP_WAIT_POLICY"] = ARGS.wait_policy  # before torch loads libgomp

import copy  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import fxquant  # noqa: E402
from fxquant.codegen import lowered_ops  # noqa: E402

L3_BYTES = 32 << 20
ROTATE_BYTES = 3 * L3_BYTES
OUT = Path(__file__).with_name("KERNELS.md")
GEMV = [("attn", 384, 384), ("fc1", 1536, 384), ("fc2", 384, 1536), ("big", 4096, 4096)]
M1500 = [("attn", 384, 384), ("fc1", 1536, 384), ("fc2", 384, 1536)]


def kernel_pipeline() -> str:
    """The default pipeline with codegen forced to keep its kernels (older trees have no never_slower)."""
    from fxquant.passes.compile_kernels import CodegenOptions
    pipe = fxquant.default_pipeline("native")
    if "never_slower" in CodegenOptions.__dataclass_fields__:
        pipe = pipe.replace(",codegen", ",codegen{never_slower=false}")
    return pipe


def copies_for(nbytes: int, dram: bool) -> int:
    return max(2, math.ceil(ROTATE_BYTES / nbytes)) if dram else 1


def rotating(callables: list) -> callable:
    it = itertools.cycle(callables)
    return lambda: next(it)()


def fxq_copies(cm, copies: int) -> list:
    """Copies of a compiled module whose kernels read independent packed weights (DRAM rotation)."""
    out = [cm]
    for _ in range(copies - 1):
        c = copy.deepcopy(cm)
        for _, op in lowered_ops(c.graph_module):
            op.kernel = op.kernel.with_weights(type(op.kernel.packed)(
                *[None if t is None else t.clone() for t in op.kernel.packed.tensors()]))
        out.append(c)
    return out


def build_methods(n: int, k: int, m: int, bits_list, dram: bool) -> tuple[dict, dict]:
    """name -> zero-argument callable (one call = one forward), and the weight bytes of each method."""
    gen = torch.Generator().manual_seed(n * 7 + k)
    x = torch.randn(m, k, generator=gen)

    def linear() -> torch.nn.Linear:
        lin = torch.nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.normal_(0.0, k ** -0.5, generator=gen)
        return lin.eval()

    torch.backends.quantized.engine = "fbgemm"
    fp = [linear() for _ in range(copies_for(n * k * 4, dram))]
    q8 = [torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear()), {torch.nn.Linear}, dtype=torch.qint8)
          for _ in range(copies_for(n * k, dram))]
    methods = {"fp32": rotating([(lambda f: lambda: f(x))(f) for f in fp]),
               "int8": rotating([(lambda q: lambda: q(x))(q) for q in q8])}
    nbytes = {"fp32": n * k * 4, "int8": n * k}
    pipe = kernel_pipeline()
    for bits in bits_list:
        cm = fxquant.compile_lowbit(torch.nn.Sequential(fp[0]), (x,), bits=bits, group_size=64, passes=pipe)
        op = lowered_ops(cm.graph_module)[0][1]
        wb = op.kernel.weight_bytes()
        cms = fxq_copies(cm, copies_for(wb, dram))
        methods[f"W{bits}"] = rotating([(lambda c: lambda: c(x))(c) for c in cms])
        nbytes[f"W{bits}"] = wb
        if bits == 4:
            kernels = [lowered_ops(c.graph_module)[0][1].kernel for c in cms]
            methods["W4 kernel"] = rotating([(lambda kk: lambda: kk(x))(kk) for kk in kernels])
    return methods, nbytes


def run_condition(cases: dict, threads: int, busy: bool, rounds: int) -> tuple[harness.Condition, dict]:
    results = {}
    with harness.condition(threads, busy) as cond, torch.inference_mode():
        for key, (methods, _) in cases.items():
            results[key] = harness.measure(methods, rounds=rounds)
            med = {k: f"{v.median_us:.1f}" for k, v in results[key].items()}
            print(f"[{cond.label()}] {key}: {med}", flush=True)
    return cond, results


def table(cases: dict, res: dict, keys: list, bits_list) -> str:
    names = ["fp32", "int8", *[f"W{b}" for b in bits_list]] + (["W4 kernel"] if 4 in bits_list else [])
    rows = []
    for key in keys:
        r = res[key]
        row = [key, *[r[nm].cell() for nm in names]]
        if 4 in bits_list:
            row += [f"{r['int8'].median_us / r['W4'].median_us:.2f}", f"{r['fp32'].median_us / r['W4'].median_us:.2f}"]
        if 8 in bits_list:
            row += [f"{r['int8'].median_us / r['W8'].median_us:.2f}"]
        rows.append(row)
    head = ["layer NxK (M)", *[f"{nm} us" for nm in names]]
    head += (["W4/int8", "W4/fp32"] if 4 in bits_list else []) + (["W8/int8"] if 8 in bits_list else [])
    return tabulate(rows, head, tablefmt="github")


def load_table(runs: list, keys: list) -> str:
    """busy / quiet median ratio per method at each thread count (1.00 = unaffected by the busy core)."""
    rows = []
    by = {(c.threads, c.busy): r for c, r in runs}
    for threads in sorted({c.threads for c, _ in runs}, reverse=True):
        quiet, busy = by.get((threads, False)), by.get((threads, True))
        if quiet is None or busy is None:
            continue
        for key in keys:
            rows.append([threads, key, *[f"{busy[key][nm].median_us / quiet[key][nm].median_us:.2f}"
                                         for nm in quiet[key]]])
    if not rows:
        return "(needs both a quiet and a busy run)"
    names = list(runs[0][1][keys[0]])
    return tabulate(rows, ["threads", "layer", *[f"{nm} busy/quiet" for nm in names]], tablefmt="github")


def main() -> int:
    args = ARGS or parse_args([])
    bits_list = tuple(int(b) for b in args.bits.split(","))
    rounds = args.rounds or (9 if args.quick else 21)
    gemv = GEMV[::3] if args.quick else GEMV
    mm = M1500[:1] if args.quick else M1500
    cases = {}
    for layer, n, k in gemv:
        dram = n * k > 4 << 20
        cases[f"{layer} {n}x{k} (1){' DRAM' if dram else ''}"] = build_methods(n, k, 1, bits_list, dram)
    for layer, n, k in mm:
        cases[f"{layer} {n}x{k} (1500)"] = build_methods(n, k, 1500, bits_list, False)
    runs = []
    for threads in (int(t) for t in args.threads.split(",")):
        for load in args.load.split(","):
            runs.append(run_condition(cases, threads, load == "busy", rounds))
    keys = list(cases)
    gemv_keys, mm_keys = [k for k in keys if "(1)" in k], [k for k in keys if "(1500)" in k]
    text = harness.header("Kernel benchmarks (fair harness)", [c for c, _ in runs])
    text += ("\nOne layer y = x W^T + b. fp32 = nn.Linear; int8 = torch.ao quantize_dynamic (fbgemm), called as a "
             "module; W{b} = fxquant.compile_lowbit(bits=b, group_size=64) (W{b}A8: int8 dynamic activations), "
             "called as the compiled module; \"W4 kernel\" = the same generated kernel called raw. Ratios = "
             "time(baseline) / time(fxquant module), higher is better. \"DRAM\" rows rotate weight copies "
             "(3x L3) so every method streams its weights from memory.\n")
    for cond, res in runs:
        text += f"\n## {cond.label()} (load {cond.load_before:.1f} -> {cond.load_after:.1f})\n\n"
        text += "### Matrix-vector (M = 1, decode)\n\n" + table(cases, res, gemv_keys, bits_list) + "\n"
        if mm_keys:
            text += "\n### M = 1500 (encoder)\n\n" + table(cases, res, mm_keys, bits_list) + "\n"
    text += "\n## Effect of one busy core (median busy / median quiet, same thread count)\n\n"
    text += load_table(runs, keys) + "\n"
    print(text)
    if not args.no_write:
        data = {"machine": harness.machine(), "bytes": {k: v[1] for k, v in cases.items()},
                "runs": [{"condition": c, "results": r} for c, r in runs]}
        harness.write_results(Path(args.out) if args.out else OUT, text, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
