"""Layer reconstruction: output SQNR of Whisper-tiny-sized linears under each weight format.

Run (~1 min on 2 cores):
    cd /work/main && python benchmarks/bench_reconstruction.py [--seed 0] [--threads 2]

Synthetic but realistic layers: fc1 384 -> 1536 and fc2 1536 -> 384 with heavy-tailed weights
(Student-t, nu = 4, scaled to std 0.02) and correlated inputs x = (z @ M^T) * c, M = Q diag(s) with Q a
random rotation and s_i = exp(-8 i / K) + 0.05 (a decaying spectrum: strongly correlated channels) and
c a per-channel gain with 1 % outlier channels x8 (as in transformer activations). Calibration
(H, diag(H)) on 16 K rows; SQNR measured on 2048 *held-out*
rows: 10 log10(||X W^T||^2 / ||X (W - W_hat)^T||^2), weight-only (float activations), plus the
exact kernel semantics with dynamic int8 activations (A8) for the GPTQ variant.
Pairs compared at (nearly) equal bytes: codebook 4-bit per-channel vs uniform 4-bit g64
(~4.5 bits/weight), codebook 4-bit g192 vs uniform 4-bit g32 (~5 bits/weight).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMATS = [  # (label, bits, scheme, granularity, group)
    ("uniform W4 g64", 4, "uniform", "group", 64),
    ("codebook W4 per-channel", 4, "codebook", "channel", None),
    ("uniform W4 g32", 4, "uniform", "group", 32),
    ("codebook W4 g192", 4, "codebook", "group", 192),
    ("uniform W3 g64", 3, "uniform", "group", 64),
    ("codebook W3 per-channel", 3, "codebook", "channel", None),
    ("uniform W8 per-channel", 8, "uniform", "channel", None),
]


def make_layer(n_out: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight [n_out, k], calibration inputs [16 K, k], held-out inputs [2048, k])."""
    t = torch.distributions.StudentT(4.0)
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    w = t.sample((n_out, k))
    w = w / w.std() * 0.02
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen))
    spectrum = torch.exp(-torch.arange(k) / (k / 8)) + 0.05          # decaying: strongly correlated channels
    mix = q * spectrum
    gain = torch.ones(k)
    gain[torch.randperm(k, generator=gen)[: max(1, k // 100)]] = 8.0   # 1 % outlier channels
    n_cal = 16 * k
    x = (torch.randn(n_cal + 2048, k, generator=gen) @ mix.T) * gain
    return w, x[:n_cal], x[n_cal:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fxquant.formats import quantize_weight, sqnr_db
    from fxquant.qweight import dequantize, reference_linear

    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for layer, (n_out, k) in (("fc1 384->1536", (1536, 384)), ("fc2 1536->384", (384, 1536))):
        w, xc, xt = make_layer(n_out, k, gen)
        h = sum(c.double().T @ c.double() for c in xc.split(4096)) / xc.shape[0]
        ref = xt @ w.T
        for label, bits, scheme, gran, group in FORMATS:
            res = {}
            for rounding in ("nearest", "gptq"):
                qw = quantize_weight(w, bits, scheme, gran, group, hessian=h, rounding=rounding)
                res[rounding] = qw
            eff = res["nearest"].nbytes() * 8 / w.numel()
            s_near = sqnr_db(ref, xt @ dequantize(res["nearest"]).T)
            s_gptq = sqnr_db(ref, xt @ dequantize(res["gptq"]).T)
            s_a8 = sqnr_db(ref, reference_linear(xt, res["gptq"]))
            rows.append([layer, label, f"{eff:.3f}", f"{s_near:.2f}", f"{s_gptq:.2f}", f"{s_gptq - s_near:+.2f}",
                         f"{s_a8:.2f}"])
            print(f"{layer} {label}: {s_near:.2f} / {s_gptq:.2f} dB", file=sys.stderr, flush=True)
    print(tabulate(rows, headers=["layer", "format", "bits/weight (bytes*8/params)", "SQNR nearest dB",
                                  "SQNR gptq dB", "gptq gain", "gptq + A8 dB"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
