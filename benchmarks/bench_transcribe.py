"""Wall time to transcribe LJ Speech files, whole process: fxquant CLI vs CTranslate2 int8 greedy.

    python benchmarks/bench_transcribe.py                         # 40 files, tiny.en, --avg-bits 4, 3 rounds
    python benchmarks/bench_transcribe.py --model whisper-base --files 20 --precision bits8
    python benchmarks/bench_transcribe.py --artifact old=/tmp/old-avg4   # + a row for a saved artifact folder

Each run is a fresh process, as a user runs it: `fxquant transcribe FILES --model M <precision>
--format tsv` (the compiled artifact is cached on disk by a warm-up run, so compile time is not
counted; its load is) against a script that loads the same checkpoint folder in CTranslate2 with
compute_type=int8, computes the log-mel features with numpy (no torch in that process, as faster-whisper
runs) and calls `generate` greedily (beam 1), one window at a time (as `fxquant transcribe` batches 8 windows, a second CTranslate2 row batches 8 too). All at the same
thread count. Rounds are interleaved; medians, min-max and the load average are printed and written to
benchmarks/TRANSCRIBE-<model>.md. `--artifact NAME=DIR` adds a row running `fxquant transcribe --artifact DIR`
(e.g. an artifact compiled before a change, to time both in the same rounds); `--out` writes elsewhere.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CT2_SCRIPT = r'''
# The CTranslate2 peer as faster-whisper runs it: numpy features, no torch in the process.
import json, sys
import numpy as np, soundfile as sf, soxr, ctranslate2
from tokenizers import Tokenizer
threads, batch, model_dir, files = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]

def mel_filters(n_mels=80, n_fft=400, sr=16000):
    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= 1000, 15 + np.log(np.maximum(f, 1e-10) / 1000) / (np.log(6.4) / 27), f / (200 / 3))
    def mel_to_hz(m):
        return np.where(m >= 15, 1000 * np.exp((np.log(6.4) / 27) * (m - 15)), m * (200 / 3))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    pts = mel_to_hz(np.linspace(hz_to_mel(0), hz_to_mel(sr / 2), n_mels + 2))
    lower = (freqs[None] - pts[:-2, None]) / (pts[1:-1] - pts[:-2])[:, None]
    upper = (pts[2:, None] - freqs[None]) / (pts[2:] - pts[1:-1])[:, None]
    return np.maximum(0, np.minimum(lower, upper)) * (2.0 / (pts[2:] - pts[:-2]))[:, None]

FILTERS = mel_filters()
WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)

def windows(path):
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if sr != 16000:
        audio = soxr.resample(audio, sr, 16000)
    n = len(audio)
    x = np.pad(np.concatenate([audio, np.zeros(480000, np.float32)]), 200, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160][:-1]
    power = np.abs(np.fft.rfft(frames * WINDOW, axis=1)) ** 2
    logmel = np.log10(np.maximum(FILTERS @ power.T, 1e-10))
    logmel = (np.maximum(logmel, logmel.max() - 8.0) + 4.0) / 4.0
    count = -(-max(1, -(-n // 160)) // 3000)
    return [np.ascontiguousarray(logmel[:, i * 3000:(i + 1) * 3000], dtype=np.float32) for i in range(count)]

tok = Tokenizer.from_file(model_dir + "/tokenizer.json")
vocab = tok.get_vocab()
multilingual = len(vocab) >= 51865
prompt = [vocab["<|startoftranscript|>"]] + ([vocab["<|en|>"], vocab["<|transcribe|>"]] if multilingual else []) \
    + [vocab["<|notimestamps|>"]]
model = ctranslate2.models.Whisper(model_dir, device="cpu", compute_type="int8", intra_threads=threads)
todo = [(f, w) for f in files for w in windows(f)]
for i in range(0, len(todo), batch):
    chunk = todo[i:i + batch]
    feats = ctranslate2.StorageView.from_array(np.stack([w for _, w in chunk]))
    for (f, _), r in zip(chunk, model.generate(feats, [prompt] * len(chunk), beam_size=1, suppress_blank=True,
                                              suppress_tokens=[-1])):
        print(f + "\t" + tok.decode(r.sequences_ids[0]).strip())
'''


# runs the command as its child and reports the child's peak resident memory (ru_maxrss, KiB on Linux) and CPU
# seconds (user + system, every thread): on a shared machine CPU time moves less than wall time
PEAK_WRAPPER = (
    "import resource, subprocess, sys\n"
    "p = subprocess.run(sys.argv[1:])\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "sys.stderr.write('\\nPEAK_RSS_KB %d CPU_S %.3f\\n' % (u.ru_maxrss, u.ru_utime + u.ru_stime))\n"
    "sys.exit(p.returncode)\n"
)


def _run(cmd: list[str], env: dict) -> tuple[float, str, float, float]:
    """(wall seconds, stdout, peak RSS MiB, CPU seconds) of one run of `cmd` (the wrapper's start is in the
    wall time)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *cmd], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd[:6])} ...\n{proc.stderr[-3000:]}")
    peak = [line.split() for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB ")][-1]
    return elapsed, proc.stdout, int(peak[1]) / 1024, float(peak[3])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="whisper-tiny.en")
    p.add_argument("--files", type=int, default=40)
    p.add_argument("--precision", default="avg4", help="bits8 | bits4 | avg4 | avg3 ...")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--artifact", action="append", default=[], metavar="NAME=DIR",
                   help="also time `fxquant transcribe --artifact DIR` (repeatable)")
    p.add_argument("--no-ct2", action="store_true", help="skip the CTranslate2 rows (they need ctranslate2)")
    p.add_argument("--out", default=None, help="results file (default benchmarks/TRANSCRIBE-<model>.md)")
    args = p.parse_args()
    from tabulate import tabulate

    from fxquant.asr.data import ljspeech

    files = [str(u.path) for u in ljspeech(args.files)]
    import soundfile

    audio_s = sum(soundfile.info(f).duration for f in files)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    flag = (["--bits", args.precision[4:]] if args.precision.startswith("bits")
            else ["--avg-bits", args.precision[3:]])
    fxq = [sys.executable, "-m", "fxquant.cli", "transcribe", *files, "--model", args.model, *flag, "--format", "tsv"]
    from fxquant.models.whisper_ckpt import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    ct2 = [sys.executable, "-c", CT2_SCRIPT, str(args.threads), "1", model_dir, *files]
    ct2_b8 = [sys.executable, "-c", CT2_SCRIPT, str(args.threads), "8", model_dir, *files]
    cmds = {"fxquant": fxq}
    for spec in args.artifact:
        name, _, folder = spec.partition("=")
        cmds[f"fxquant ({name})"] = [sys.executable, "-m", "fxquant.cli", "transcribe", *files, "--artifact",
                                     folder, "--format", "tsv"]
    if not args.no_ct2:
        cmds.update({"ct2-int8 (batch 1)": ct2, "ct2-int8 (batch 8)": ct2_b8})
    print("warm-up (compiles and caches the fxquant artifact if needed) ...", file=sys.stderr)
    for name, cmd in cmds.items():
        if name != "ct2-int8 (batch 8)":
            _run(cmd, env)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in cmds}
    peaks: dict[str, list[float]] = {name: [] for name in cmds}
    cpus: dict[str, list[float]] = {name: [] for name in cmds}
    outputs = {}
    for r in range(args.rounds):
        order = list(cmds.items())
        for name, cmd in order[r % len(order):] + order[:r % len(order)]:
            t, out, peak, cpu = _run(cmd, env)
            times[name].append(t)
            peaks[name].append(peak)
            cpus[name].append(cpu)
            outputs[name] = out
            print(f"round {r + 1} {name}: {t:.1f} s ({cpu:.1f} s CPU), peak RSS {peak:.0f} MiB", file=sys.stderr)
    load_after = os.getloadavg()
    base = statistics.median(times.get("ct2-int8 (batch 1)", times["fxquant"]))
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append([name, f"{med:.2f}", f"{min(ts):.2f}-{max(ts):.2f}", f"{audio_s / med:.1f}x",
                     f"{base / med:.2f}x", f"{statistics.median(cpus[name]):.2f}", f"{max(peaks[name]):.0f}"])
    label = f"fxquant ({args.precision})"
    rows[0][0] = label
    table = tabulate(rows, headers=["variant", "median s", "min-max s", "real-time factor",
                                    "vs fxquant" if args.no_ct2 else "vs CT2 batch 1", "median CPU s",
                                    "peak RSS MiB"],
                     tablefmt="github")
    header = (f"`python benchmarks/bench_transcribe.py {' '.join(sys.argv[1:])}`\n\n"
              f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} ({_cpu()}), {args.threads} threads, "
              f"{len(files)} LJ Speech files ({audio_s:.0f} s of audio), whole process per run (start-up, model "
              f"load, features, decode), {args.rounds} interleaved rounds. Load average before "
              f"{load_before[0]:.2f}, after {load_after[0]:.2f} (2 cores). CPU s: user + system seconds of the "
              f"process, all threads (less sensitive than wall time to other work on the machine). Peak RSS: the "
              f"largest resident set of the process over the rounds.\n\n")
    print(table)
    out = Path(args.out) if args.out else HERE / f"TRANSCRIBE-{args.model}.md"
    out.write_text(f"# Transcription wall time: {args.model}\n\n" + header + table + "\n")
    print(f"wrote {out}", file=sys.stderr)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
