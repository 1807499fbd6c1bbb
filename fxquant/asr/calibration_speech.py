"""English calibration speech shipped with fxquant: 32 sentences written for this project, spoken by espeak-ng.

Whisper's decoder is calibrated teacher-forced on transcripts, so its calibration audio must carry
ordinary English: FSDD digit recordings alone give the decoder ten words. These clips are synthetic
(eight espeak-ng English voices at 140-180 words per minute), their texts are not from any scoring set,
and no LJ Speech audio or text is used, so calibrating on them leaves every score held out.

The clips live in fxquant/data/calibration/ (16 kHz mono Ogg Vorbis, ~0.8 MB); regenerate them with
`python -m fxquant.asr.calibration_speech` (needs the espeak-ng program: `apt install espeak-ng`).

Example:
    >>> waves = english_waves(2)
    >>> len(waves), waves[0].dtype, 1.0 < waves[0].numel() / 16000 < 10.0
    (2, torch.float32, True)
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

__all__ = ["CALIBRATION_DIR", "VOICES", "sentences", "english_waves", "generate"]

CALIBRATION_DIR = Path(__file__).resolve().parent.parent / "data" / "calibration"
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us+f3", "en-gb+m3", "en-us+f2")


def sentences(folder: Path = CALIBRATION_DIR) -> list[str]:
    """The calibration sentences, one per clip, in clip order."""
    return [s.strip() for s in (folder / "sentences.txt").read_text(encoding="utf-8").splitlines() if s.strip()]


def _clip(folder: Path, i: int) -> Path:
    return folder / f"english_{i:02d}.ogg"


def english_waves(n: int | None = None, folder: Path = CALIBRATION_DIR) -> list[torch.Tensor]:
    """The first `n` (default all) calibration clips as 16 kHz mono float32 waves."""
    from fxquant.audio import load_audio

    count = len(sentences(folder)) if n is None else n
    paths = [_clip(folder, i) for i in range(count)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"calibration clip {missing[0]} is missing from {folder}; reinstall fxquant or "
                                f"regenerate with `python -m fxquant.asr.calibration_speech`")
    return [load_audio(p) for p in paths]


def generate(folder: Path = CALIBRATION_DIR) -> list[Path]:
    """Speak every sentence with espeak-ng (voices and speeds rotate) into 16 kHz Ogg Vorbis clips."""
    import soundfile as sf

    from fxquant.audio import load_audio

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed; install it (`apt install espeak-ng`) to regenerate "
                           "the calibration clips")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(sentences(folder)):
            wav = Path(tmp) / f"{i}.wav"
            speed = 140 + (i * 7) % 40
            subprocess.run([espeak, "-v", VOICES[i % len(VOICES)], "-s", str(speed), "-w", str(wav), text],
                           check=True, capture_output=True)
            sf.write(_clip(folder, i), load_audio(wav).numpy(), 16000, format="OGG", subtype="VORBIS")
            out.append(_clip(folder, i))
    return out


if __name__ == "__main__":
    written = generate(Path(sys.argv[1]) if len(sys.argv) > 1 else CALIBRATION_DIR)
    print(f"wrote {len(written)} clips to {written[0].parent}")
