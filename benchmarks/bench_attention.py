"""Fair attention benchmark: fxquant's attention kernel vs torch SDPA at Whisper decode (Lq = 1) and encoder shapes.

Run (not collected by pytest):
    python benchmarks/bench_attention.py                 # 2 threads and 1; quiet and one core busy
    python benchmarks/bench_attention.py --quick --threads 2 --load quiet
    python benchmarks/bench_attention.py --wait-policy passive
    python benchmarks/bench_attention.py --only prefill --no-write   # the encoder table alone

Rows: cross-attention (Lk = 1500 encoder frames, no mask) and self-attention over the 448-slot decoder cache
with an additive mask that is -inf beyond the current offset (10, 50, 200 filled slots), for tiny (H = 6) and
base (H = 8), D = 64. The cache is laid out as Whisper's: a [B, 448, H, D] buffer viewed as [B, H, 448, D]
(strided, never copied). A second table puts the int8 key / value kernel (per-row scales from
quantize_activation_per_row) next to float32 for the cross-attention shapes, cache-resident and with caches
evicted before every call (a 64 MB buffer is read, untimed: in a real decode step the 18 MB of float32 cross
K / V plus the weights overflow the 32 MB L3). Both sides run at the same thread count and wait policy in
interleaved rounds (benchmarks/harness.py); quiet and with one busy-loop process. A prefill table times the
encoder's self-attention (Lq = Lk = 1500, no mask, q / k / v strided views of [B, T, H*D] as Whisper's; B = 1
and 2): torch fp32 SDPA vs the kernel's bf16 flash-attention path (attention_prefill.c.j2). Writes
benchmarks/ATTENTION.md and ATTENTION.json.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny only, fewer rounds")
    ap.add_argument("--threads", default="2,1", help="thread counts (default 2,1)")
    ap.add_argument("--load", default="quiet,busy", help="quiet, busy (one busy-loop process) or both")
    ap.add_argument("--wait-policy", choices=["default", "passive", "active"], default="default",
                    help="OMP_WAIT_POLICY for torch and fxquant alike (default: leave unset)")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 21, --quick 9)")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/ATTENTION.md)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--only", choices=["all", "decode", "prefill"], default="all", help="which tables to run")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.wait_policy != "default":
    os.environ["OMP_WAIT_POLICY"] = ARGS.wait_policy  # before torch loads libgomp

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tabulate import tabulate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fxquant.codegen.attention import attention_kernel  # noqa: E402
from fxquant.qweight import quantize_activation_per_row  # noqa: E402

CTX = 448
EVICT_BYTES = 64 << 20
OUT = Path(__file__).with_name("ATTENTION.md")


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


def decode_cases(models) -> dict:
    """row key -> (methods, max |err| of ours vs torch)."""
    kern = attention_kernel(64, "native")
    out = {}
    for model, h in models:
        for lk, offset in ((1500, None), (CTX, 10), (CTX, 50), (CTX, 200)):
            q, k, v, mask = operands(h, lk, offset)
            err = (kern(q, k, v, mask) - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max().item()
            what = "cross, no mask" if offset is None else f"self, offset {offset}"
            out[f"{model} H={h} Lk={lk} {what}"] = (
                {"torch SDPA": lambda q=q, k=k, v=v, m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                 "fxquant": lambda q=q, k=k, v=v, m=mask: kern(q, k, v, m)}, err)
    return out


def int8_cases(models) -> dict:
    """Cross-attention: torch and our float32 kernel vs the int8 kernel (strided and contiguous layouts)."""
    kern, kern8 = attention_kernel(64, "native"), attention_kernel(64, "native", kv_dtype="int8")
    out = {}
    for model, h in models:
        q, k, v, _ = operands(h, 1500, None)
        (kq, ks), (vq, vs) = quantize_activation_per_row(k), quantize_activation_per_row(v)
        (kc, ksc), (vc, vsc) = quantize_activation_per_row(k.contiguous()), quantize_activation_per_row(v.contiguous())
        ref = F.scaled_dot_product_attention(q, kq.float() * ks, vq.float() * vs)
        err = (kern8(q, kq, vq, key_scale=ks, value_scale=vs) - ref).abs().max().item()
        out[f"{model} H={h}"] = ({"torch SDPA fp32": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                                  "fxquant fp32": lambda q=q, k=k, v=v: kern(q, k, v),
                                  "fxquant int8": lambda q=q, a=kq, b=vq, c=ks, d=vs:
                                      kern8(q, a, b, key_scale=c, value_scale=d),
                                  "int8 [B,H,Lk,D] copy": lambda q=q, a=kc, b=vc, c=ksc, d=vsc:
                                      kern8(q, a, b, key_scale=c, value_scale=d)}, err)
    return out


def ms_cell(st) -> str:
    """'median [q1-q3]' in ms of a harness.Stats."""
    return f"{st.median_us / 1e3:.2f} [{st.q1_us / 1e3:.2f}-{st.q3_us / 1e3:.2f}]"


def prefill_cases(models) -> dict:
    """Encoder self-attention, T = 1500: torch fp32 SDPA vs the bf16 prefill path; max |err| / max |v|."""
    kern = attention_kernel(64, "native")
    out = {}
    for model, h in models:
        for b in (1, 2):
            gen = torch.Generator().manual_seed(h * 10 + b)
            x = torch.randn(b, 1500, 3 * h * 64, generator=gen)
            q, k, v = (x[..., i * h * 64:(i + 1) * h * 64].view(b, 1500, h, 64).transpose(1, 2) for i in range(3))
            ref = F.scaled_dot_product_attention(q, k, v)
            err = ((kern(q, k, v) - ref).abs().max() / v.abs().max()).item() if kern.has_prefill else float("nan")
            out[f"{model} H={h} B={b}"] = ({"torch SDPA": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                                            "fxquant": lambda q=q, k=k, v=v: kern(q, k, v)}, err)
    return out


def main() -> int:
    args = ARGS or parse_args([])
    rounds = args.rounds or (9 if args.quick else 21)
    models = [("tiny", 6)] if args.quick else [("tiny", 6), ("base", 8)]
    dec, i8 = (decode_cases(models), int8_cases(models)) if args.only != "prefill" else ({}, {})
    pre = prefill_cases(models) if args.only != "decode" else {}
    junk = torch.ones(EVICT_BYTES // 4)
    runs = []
    for threads in (int(t) for t in args.threads.split(",")):
        for load in args.load.split(","):
            res = {}
            with harness.condition(threads, load == "busy") as cond, torch.inference_mode():
                for key, (methods, _) in dec.items():
                    res[key] = harness.measure(methods, rounds=rounds)
                for key, (methods, _) in i8.items():
                    res[f"{key} resident"] = harness.measure(methods, rounds=rounds)
                    res[f"{key} evicted"] = harness.measure(methods, rounds=max(5, rounds // 2), before=junk.sum)
                for key, (methods, _) in pre.items():
                    res[f"prefill {key}"] = harness.measure(methods, rounds=max(5, rounds // 2), min_sample_s=0)
                print(f"[{cond.label()}] done", flush=True)
            runs.append((cond, res))
    text = harness.header("Attention kernel benchmarks (fair harness)", [c for c, _ in runs])
    text += ("\nDecode shapes, B = 1, Lq = 1, D = 64. torch SDPA = F.scaled_dot_product_attention; fxquant = "
             "attention_kernel(64) called directly (FusedAttention calls it with no other work). Speed-up = "
             "time(torch) / time(fxquant). Prefill: Lq = Lk = 1500, D = 64, no mask, ms per call; fxquant rounds "
             "q * scale, k, v and the softmax weights to bf16 (fp32 sums); the error column is max |err| / max |v| "
             "(the tests bound it by 2^-8 against SDPA on the bf16-rounded operands).\n")
    for cond, res in runs:
        text += f"\n## {cond.label()} (load {cond.load_before:.1f} -> {cond.load_after:.1f})\n\n"
        if pre:
            rows = [[k, ms_cell(res[f"prefill {k}"]["torch SDPA"]), ms_cell(res[f"prefill {k}"]["fxquant"]),
                     f"{res[f'prefill {k}']['torch SDPA'].median_us / res[f'prefill {k}']['fxquant'].median_us:.1f}x",
                     f"{err:.1e}"] for k, (_, err) in pre.items()]
            text += "Encoder self-attention (prefill), T = 1500\n\n"
            text += tabulate(rows, ["shape", "torch SDPA ms", "fxquant bf16 ms", "speed-up", "max |err| / max |v|"],
                             tablefmt="github") + "\n\n"
        if not dec:
            continue
        rows = [[k, res[k]["torch SDPA"].cell(), res[k]["fxquant"].cell(),
                 f"{res[k]['torch SDPA'].median_us / res[k]['fxquant'].median_us:.1f}x", f"{err:.1e}"]
                for k, (_, err) in dec.items()]
        text += tabulate(rows, ["shape", "torch SDPA us", "fxquant us", "speed-up", "max |err|"], tablefmt="github")
        text += "\n\nCross-attention Lk = 1500, float32 vs int8 K / V (evicted: 64 MB read before each call)\n\n"
        rows = []
        for key, (methods, err) in i8.items():
            for state in ("resident", "evicted"):
                r = res[f"{key} {state}"]
                rows.append([key, state, *(r[m].cell() for m in methods),
                             f"{r['fxquant fp32'].median_us / r['fxquant int8'].median_us:.1f}x", f"{err:.1e}"])
        text += tabulate(rows, ["model", "K/V", *[f"{m} us" for m in next(iter(i8.values()))[0]], "int8 vs fp32",
                                "max |err| int8"], tablefmt="github") + "\n"
    print(text)
    if not args.no_write:
        harness.write_results(Path(args.out) if args.out else OUT, text,
                              {"machine": harness.machine(), "runs": [{"condition": c, "results": r} for c, r in runs]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
