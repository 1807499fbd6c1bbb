"""Speech recognition with real Whisper checkpoints: compile, transcribe, evaluate.

    >>> import fxquant
    >>> fxquant.transcribe("whisper-tiny.en", ["a.flac"], bits=8)    # doctest: +SKIP
    ['Printing, in the only sense with which we are at present concerned, ...']
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["transcribe", "load_transcriber"]


def load_transcriber(model, bits: int | None = None, avg_bits: float | None = None, log=print):
    """A Transcriber for a zoo name / checkpoint path, a compiled-Whisper artifact folder, a
    WhisperCheckpoint or a CompiledWhisper; `bits` / `avg_bits` compile (cached on disk)."""
    from fxquant.models.whisper_ckpt import WhisperCheckpoint, load_checkpoint
    from fxquant.models.whisper_text import WhisperTokenizer

    from .cache_index import remember
    from .compiled import CompiledWhisper, cached_compile, precision_key
    from .transcriber import Transcriber

    if isinstance(model, (str, Path)) and (Path(model) / "whisper.json").is_file():
        model = CompiledWhisper.load(model)
    if isinstance(model, CompiledWhisper):
        if bits is not None or avg_bits is not None:
            raise ValueError("a compiled artifact has its precision already; drop bits / avg_bits")
        return Transcriber(model.parts(), WhisperTokenizer.from_file(model.tokenizer_file), n_mels=model.dims.n_mels)
    if bits is None and avg_bits is None:
        ckpt = model if isinstance(model, WhisperCheckpoint) else load_checkpoint(model)
        return Transcriber.from_checkpoint(ckpt)
    cw, key = None, None
    if not isinstance(model, WhisperCheckpoint):     # the cached artifact, found without loading the checkpoint
        cw, key = _indexed(model, precision_key(bits, avg_bits), log)
    if cw is None:
        ckpt = model if isinstance(model, WhisperCheckpoint) else load_checkpoint(model)
        cw = cached_compile(ckpt, bits=bits, avg_bits=avg_bits, log=log)
        if key is not None and cw.directory is not None:
            remember(key, cw.directory)
    return Transcriber(cw.parts(), WhisperTokenizer.from_file(cw.tokenizer_file), n_mels=cw.dims.n_mels)


def _indexed(model, precision: str, log):
    """(CompiledWhisper, index key) from fxquant.asr.cache_index, or (None, key) on a miss or a bad artifact."""
    import time

    from fxquant.errors import ArtifactError

    from .cache_index import index_key, lookup
    from .compiled import CompiledWhisper

    key = index_key(model, precision)
    folder = lookup(key)
    if folder is None:
        return None, key
    start = time.perf_counter()
    try:
        cw = CompiledWhisper.load(folder)
    except ArtifactError as exc:
        log(f"cached artifact unusable ({exc}); loading the checkpoint")
        return None, key
    log(f"loaded compiled {cw.name} ({cw.precision}) from {folder} in {time.perf_counter() - start:.1f} s")
    return cw, key


def transcribe(model, paths: Sequence, bits: int | None = None, avg_bits: float | None = None) -> list[str]:
    """Texts of audio files (WAV/FLAC/OGG, any rate, mono or stereo) with a Whisper model.

    `model`: "whisper-tiny.en", "whisper-base", a checkpoint folder or .pt, or a compiled artifact folder.
    """
    t = load_transcriber(model, bits=bits, avg_bits=avg_bits, log=lambda *a: None)
    return [r.text for r in t.transcribe_files(list(paths))]
