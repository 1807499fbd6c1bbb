"""Synthesize the demo's fallback audio (used when ../shared is absent) with espeak-ng.

    apt-get install espeak-ng sox      # once
    python scripts/make_demo_audio.py  # writes fxquant/data/demo/*.wav and labels.txt

12 connected-digit strings, 4 espeak-ng voices, 8 kHz 16-bit mono (like FSDD), seeded.
"""
from __future__ import annotations

import random
import subprocess
import tempfile
from pathlib import Path

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOICES = ["en-us", "en-gb", "en-us+m3", "en-gb+f2"]
OUT = Path(__file__).resolve().parents[1] / "fxquant" / "data" / "demo"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    labels = []
    for i in range(12):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        voice, speed = VOICES[i % len(VOICES)], rng.randint(120, 160)
        with tempfile.NamedTemporaryFile(suffix=".wav") as raw:
            subprocess.run(
                ["espeak-ng", "-v", voice, "-s", str(speed), "-g", "8", "-w", raw.name, ", ".join(words)],
                check=True,
            )
            name = f"demo_{i:02d}.wav"
            subprocess.run(
                ["sox", raw.name, "-r", "8000", "-b", "16", "-c", "1", str(OUT / name)], check=True
            )
        labels.append(f"{name}\t{' '.join(words)}\t{voice}")
    (OUT / "labels.txt").write_text("\n".join(labels) + "\n")


if __name__ == "__main__":
    main()
