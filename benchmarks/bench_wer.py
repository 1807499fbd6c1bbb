"""Word error rate of real Whisper variants on real speech, each variant in its own process.

    python benchmarks/bench_wer.py                                  # tiny.en, every variant (~30-60 min)
    python benchmarks/bench_wer.py --model whisper-base --variants fp32,ct2-int8,bits8,avg4
    python benchmarks/bench_wer.py --variants openai-fp32,fp32 --fsdd 0 --out benchmarks/WER-whisper-tiny.en-openai.md

Scores all 186 LJ Speech utterances and 60 FSDD digit sentences (test takes) per variant: greedy decoding,
both sides through fxquant.textnorm's English normaliser. Compiled variants are calibrated on FSDD training
takes only (another six speakers than any scored one). Each variant runs in a fresh process so its peak
resident memory is its own; compile time is reported separately (a cached artifact is reused, as the CLI
does). Writes benchmarks/WER-<model>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = "openai-fp32,fp32,torch-int8,ct2-int8,bits8,bits4,avg4,avg3"


def worker(args) -> None:
    import torch

    from fxquant.asr.evaluation import evaluate_whisper

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    row = evaluate_whisper(args.model, [args.variant], limit=args.limit, fsdd=args.fsdd,
                           log=lambda *a: print(*a, file=sys.stderr))[0]
    print("RESULT " + json.dumps({"variant": row.variant, "wer": row.wer, "bytes": row.model_bytes,
                                  "rtf": row.rtf, "note": row.note, "seconds": time.perf_counter() - start,
                                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "hyps": row.hyps}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="whisper-tiny.en")
    p.add_argument("--variants", default=DEFAULT)
    p.add_argument("--limit", type=int, help="score only the first N LJ Speech utterances")
    p.add_argument("--fsdd", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the table here (default benchmarks/WER-<model>.md; the transcripts go "
                                 "beside it as <name>-transcripts.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from tabulate import tabulate

    results = []
    load = [os.getloadavg()[0]]
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--variant", variant,
               "--fsdd", str(args.fsdd), "--threads", str(args.threads)] + (["--limit", str(args.limit)]
                                                                            if args.limit else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{variant}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[7:]))
        load.append(os.getloadavg()[0])
        print(f"{variant}: {results[-1]['wer']} ({results[-1]['seconds']:.0f} s)", file=sys.stderr)
    base = next((r for r in results if r["variant"] == "fp32"), None)
    sets = sorted({k for r in results for k in r["wer"]})
    rows = []
    for r in results:
        row = [r["variant"]]
        for s in sets:
            if s not in r["wer"]:
                row.append(r["note"] or "-")
                continue
            delta = f" ({r['wer'][s] - base['wer'][s]:+.2f})" if base and r is not base else ""
            row.append(f"{r['wer'][s]:.2f}{delta}")
        row += [f"{r['bytes'] / 2**20:.1f}" if r["bytes"] else "-", f"{r['peak_rss_mib']:.0f}",
                f"{r['rtf']:.3f}" if r["rtf"] else "-"]
        rows.append(row)
    headers = ["variant"] + [f"WER % {s} (vs fp32)" for s in sets] + ["weights MiB", "peak RSS MiB",
                                                                     "s compute per s audio"]
    table = tabulate(rows, headers=headers, tablefmt="github")
    print(table)
    n_lj = len(base["hyps"].get("ljspeech", [])) if base else "?"
    header = (f"`python benchmarks/bench_wer.py {' '.join(sys.argv[1:])}`\n\nMeasured {time.strftime('%Y-%m-%d %H:%M')} "
              f"on {platform.machine()}, {args.threads} threads; {n_lj} LJ Speech utterances and {args.fsdd} FSDD "
              f"digit sentences (test takes), greedy decoding, normalised text. Load average during the run: "
              f"{min(load):.1f}-{max(load):.1f} (2 cores; the speed column is only indicative under load).\n\n")
    out = Path(args.out) if args.out else HERE / f"WER-{args.model}.md"
    out.write_text(f"# Word error rate: {args.model}\n\n" + header + table + "\n")
    out.with_name(f"{out.stem}-transcripts.json").write_text(json.dumps(
        {r["variant"]: r["hyps"] for r in results}, indent=0))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
