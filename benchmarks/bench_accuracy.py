"""Keyword accuracy of BC-ResNet-2 on all 3000 FSDD clips: fp32 vs low-bit formats.

Run (needs ../shared with the pretrained weights and FSDD; ~3-5 min per config):
    cd /work/main && OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_accuracy.py \
        [--configs fp32,w8a8,...] [--threads 1] [--out benchmarks/ACCURACY.md]

The script writes its own results: the table, the command, the machine and the load average go into the
block between `<!-- bench_accuracy:begin -->` and `<!-- bench_accuracy:end -->` of `--out` (replaced on
every run; the rest of that file, the commentary, is left alone; appended when the file has no such block).
`--out ''` only prints.

Each configuration is compiled with `fxquant.compile_lowbit(..., target="reference")` (the exact
reference semantics of the kernels: dynamic per-row int8 activations for groups == 1 convs),
calibrated on 256 clips of the FSDD *train* split (takes 5-49), and evaluated on all 3000 clips
(1 s centre crop/pad). Defaults applied by assign-precision and stated here: depthwise convs
(groups == C_in, 3-tap kernels, 1.9k of the 24.9k weights) stay W8 per-channel and count 8 bits
in the average (except mixed-2.5, where the W8 depthwise floor alone needs 2.53 bits, so a rule
hands them to the solver); no other layer is pinned (the solver decides the first conv and the head).
Columns: accuracy, delta vs fp32, packed weight bytes (quantized layers + fp32 leftovers such as
biases), average weight bits (nominal code bits weighted by params, float = 32), effective bits
(packed weight bytes * 8 / params: includes scales and tables).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {
    "fp32": None,
    "w8a8": dict(bits=8),
    "w4-g64": dict(bits=4),
    "w4-codebook": dict(bits=4, scheme="codebook"),
    "w4-codebook-gptq": dict(bits=4, scheme="codebook", gptq=True),
    "mixed-4": dict(avg_bits=4.0),
    "mixed-3": dict(avg_bits=3.0),
    "mixed-3-gptq": dict(avg_bits=3.0, gptq=True),
    # 2.5 bits is below what the W8 depthwise default allows (minimum 2.53): a rule without bits lets
    # the solver choose the depthwise formats too (restricted to per-channel candidates)
    "mixed-2.5": dict(avg_bits=2.5, rules={"op:depthwise": {"granularity": "channel"}}),
}
DEFAULT = "fp32,w8a8,w4-g64,w4-codebook,mixed-4,mixed-3,mixed-2.5"
HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- bench_accuracy:begin -->", "<!-- bench_accuracy:end -->"


def write_block(path: Path, block: str) -> None:
    """Replace the BEGIN..END block of `path` with `block` (append it when the file has none)."""
    text = path.read_text() if path.is_file() else ""
    new = f"{BEGIN}\n{block.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + new + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + new + "\n"
    path.write_text(text)
    print(f"wrote the results block of {path}", file=sys.stderr)


def weight_stats(cm) -> tuple[float, float]:
    """(nominal average bits, effective bits) over the quantizable layers of a compiled module."""
    from fxquant import ir

    bits = params = nbytes = 0
    for node in cm.graph_module.graph.nodes:
        d, q = node.meta.get(ir.DECISION), node.meta.get(ir.QUANT_STATS)
        if d is None or q is None:
            continue
        bits += (32 if d.weight_bits is None else d.weight_bits) * q["params"]
        params += q["params"]
        nbytes += q["bytes"]
    return bits / max(params, 1), nbytes * 8 / max(params, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=DEFAULT, help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib", type=int, default=256, help="calibration clips from the train split")
    ap.add_argument("--out", default=str(HERE / "ACCURACY.md"),
                    help="markdown file whose bench_accuracy block gets the results ('' = print only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_run, load_before = time.perf_counter(), os.getloadavg()[0]
    import fxquant
    from fxquant.models.bcresnet import fsdd_features, keyword_accuracy, load_bcresnet
    from fxquant.runtime import tensor_bytes

    model = load_bcresnet()
    feats, _ = fsdd_features("all")
    train, _ = fsdd_features("train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:args.calib]
    calib = [(train[order[i:i + 32]],) for i in range(0, len(order), 32)]
    rows, base = [], None
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
        start = time.perf_counter()
        kwargs = CONFIGS[name]
        if kwargs is None:
            net, nbytes, avg, eff, secs = model, tensor_bytes(model), 32.0, 32.0, 0.0
        else:
            net = fxquant.compile_lowbit(model, (feats[:2],), calibration=calib, target="reference",
                                         progress=False, **kwargs)
            secs = time.perf_counter() - start
            nbytes = tensor_bytes(net.graph_module)
            avg, eff = weight_stats(net)
        with torch.no_grad():
            correct, total = keyword_accuracy(net)
        acc = 100.0 * correct / total
        base = acc if base is None else base
        rows.append([name, f"{acc:.2f}", f"{correct}/{total}", f"{acc - base:+.2f}", nbytes, f"{avg:.2f}", f"{eff:.2f}", f"{secs:.0f}"])
        print(f"{name}: {acc:.2f}% ({correct}/{total}) {nbytes} bytes avg {avg:.2f} bits", file=sys.stderr, flush=True)
    table = tabulate(rows, headers=["config", "acc %", "correct", "delta", "bytes", "avg bits", "eff bits", "compile s"],
                     tablefmt="github", disable_numparse=True)
    print(table)
    if args.out:
        from harness import machine
        m = machine()
        block = "\n".join([
            f"Measured {m['date']} by `python benchmarks/bench_accuracy.py {' '.join(sys.argv[1:])}` (this block is "
            "written by that script)",
            f"on {m['cpu']} ({m['cores']} cores, shared), torch {m['torch']} at {args.threads} thread(s), "
            f"Python {m['python']}; 1-minute load average {load_before:.1f} before -> {os.getloadavg()[0]:.1f} after; "
            f"whole run {(time.perf_counter() - t_run) / 60:.1f} min. Calibration: {args.calib} train-split clips.",
            "", table, ""])
        write_block(Path(args.out), block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
