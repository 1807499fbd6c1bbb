"""`fxquant demo`: compile the digit recognizer at several budgets, transcribe speech, print one table.

Audio: connected-digit strings built from the FSDD test takes when ../shared is present; otherwise
the espeak-ng utterances shipped in fxquant/data/demo (made by scripts/make_demo_audio.py).
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

DEMO_AUDIO = Path(__file__).resolve().parent / "data" / "demo"
VARIANTS = ("fp32", "torch-int8", "W8A8", "W4", "mixed-3.0", "mixed-2.5")


def shipped_audio() -> tuple[list[torch.Tensor], list[list[str]]]:
    """The synthesized fallback utterances (16 kHz) and their words."""
    from .audio import load_wav, resample

    waves, refs = [], []
    for line in (DEMO_AUDIO / "labels.txt").read_text().splitlines():
        name, words, _voice = line.split("\t")
        wave, sr = load_wav(DEMO_AUDIO / name)
        waves.append(resample(wave, sr, 16000))
        refs.append(words.split())
    return waves, refs


def run_demo(quick: bool = False) -> int:
    from . import codegen
    from .datasets import shared_dir
    from .evaluate import evaluate_digit_variants, render

    start = time.perf_counter()
    host = codegen.detect_host()
    print(f"fxquant demo: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, kernels for target '{host.name}'")
    if shared_dir() is not None:
        import random

        from .datasets import DigitStringBuilder, digit_test_set

        n = 60 if quick else 150
        tests = digit_test_set(n)
        waves, refs = [w for w, _ in tests], [r for _, r in tests]
        rng = random.Random(1234)
        builder = DigitStringBuilder("train")
        calib = [builder.sample(rng)[0] for _ in range(16)]
        source = f"{n} connected-digit strings from FSDD test takes (6 speakers, real speech)"
    else:
        waves, refs = shipped_audio()
        calib = waves
        source = (f"{len(waves)} espeak-ng digit strings shipped with fxquant (../shared not found; synthetic "
                  f"voices the model never heard, calibrated on the same audio)")
    audio_s = sum(w.numel() for w in waves) / 16000
    print(f"audio: {source}, {audio_s:.0f} s in all\n")
    rows = evaluate_digit_variants(waves, refs, calib, VARIANTS, n_latency=10 if quick else 20)
    print()
    for r in rows:
        if r.variant in ("fp32", "mixed-3.0", "mixed-2.5"):
            for ref, hyp in r.samples[:2]:
                print(f"  {r.variant:>10}  ref: {' '.join(ref):<40} hyp: {' '.join(hyp)}")
    print()
    print(render(rows, "digit recognizer: word error rate, size and speed per variant"))
    print(f"\n(demo took {time.perf_counter() - start:.0f} s; full evaluation: fxquant eval digits)")
    return 0
