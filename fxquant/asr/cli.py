"""Whisper subcommands of the `fxquant` CLI: transcribe, compile, eval (registered by fxquant.cli).

    fxquant transcribe a.flac b.wav --model whisper-tiny.en --bits 8 --format tsv
    fxquant compile whisper-tiny.en --avg-bits 4 --out out/tiny-avg4
    fxquant eval whisper-tiny.en --variants fp32,bits8,avg4
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from fxquant.errors import ConfigError

WHISPER_MODELS = ("whisper-tiny.en", "whisper-base")


def is_whisper(name: str | None) -> bool:
    """True for a Whisper zoo name, a checkpoint folder/.pt, or a compiled Whisper artifact folder."""
    if not name:
        return False
    p = Path(name)
    return name in WHISPER_MODELS or name.startswith("whisper") or (p / "whisper.json").is_file() or \
        (p / "model.bin").is_file() or p.suffix == ".pt" or (p / "model.safetensors").is_file()


def _precision(args) -> tuple[int | None, float | None]:
    precision = getattr(args, "precision", None)
    if precision not in (None, "fp32"):
        raise ConfigError(f"--precision takes 'fp32'; use --bits N or --avg-bits X for low-bit, got {precision!r}")
    if precision == "fp32" and (args.bits is not None or args.avg_bits is not None):
        raise ConfigError("--precision fp32 cannot be combined with --bits / --avg-bits")
    return args.bits, args.avg_bits


def _log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def cmd_transcribe_whisper(args) -> int:
    """Transcribe files; txt prints one text per file, tsv `path<TAB>text`, json a list of objects.

    Python's cyclic garbage collector is off while it runs (and back on after): loading the model and
    decoding make no reference cycles worth collecting, and its full passes over torch's ~180k objects took
    0.07 s of a 40-file run. At interpreter exit the objects are frozen first (`_freeze_at_exit`)."""
    import gc

    _freeze_at_exit()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _transcribe(args)
    finally:
        if enabled:
            gc.enable()


_FREEZE_REGISTERED = []


def _freeze_at_exit() -> None:
    """Register (once) an atexit hook that moves every object to gc's permanent generation: the
    interpreter's shutdown then skips its cyclic collections over them (0.3 -> 0.1 s of the exit of a
    process that loaded torch and a model). Only earlier exit hooks and the shutdown run after it, and
    freezing changes nothing for them but those skipped collections, also when the command ran inside
    another program's process (the tests)."""
    import atexit
    import gc

    if not _FREEZE_REGISTERED:
        atexit.register(gc.freeze)
        _FREEZE_REGISTERED.append(True)


def _transcribe(args) -> int:
    from fxquant.audio import load_audio
    from fxquant.progress import Progress

    from . import load_transcriber

    for path in args.audio:          # fail before compiling when a file is missing or unreadable
        if not Path(path).is_file():
            raise ConfigError(f"audio file not found: {path}")
    bits, avg = _precision(args)
    source = args.artifact or args.model
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    transcriber = load_transcriber(source, bits=bits, avg_bits=avg, log=_log)
    if args.batch_size is not None:
        transcriber.options = dataclasses.replace(transcriber.options, batch_size=args.batch_size)
    waves = [load_audio(p) for p in args.audio]
    bar = Progress("transcribe", len(waves), len(waves) > 1 and sys.stderr.isatty())
    start = time.perf_counter()
    results = transcriber.transcribe_audio(waves, progress=bar.step)
    elapsed = time.perf_counter() - start
    if args.format == "json":
        print(json.dumps([{"path": str(p), "text": r.text,
                           "no_speech_prob": [round(w.no_speech_prob, 4) for w in r.windows],
                           "temperature": r.temperatures} for p, r in zip(args.audio, results)], indent=1))
    else:
        for path, r in zip(args.audio, results):
            print(f"{path}\t{r.text}" if args.format == "tsv" else r.text)
    audio_s = sum(w.numel() for w in waves) / 16000
    _log(f"transcribed {len(waves)} file(s), {audio_s:.1f} s of audio in {elapsed:.1f} s")
    return 0


def cmd_compile_whisper(args) -> int:
    from fxquant.models.whisper_ckpt import load_checkpoint

    from .compiled import compile_whisper

    if args.budget_bytes is not None:
        raise ConfigError("Whisper compiles take --bits or --avg-bits (a budget in bytes is not supported yet)")
    ckpt = load_checkpoint(args.model)
    _log(f"compiling {ckpt.name} ...")
    cw = compile_whisper(ckpt, bits=args.bits, avg_bits=args.avg_bits, target=args.target, log=_log)
    print(cw.report())
    _log(f"compiled in {cw.compile_seconds:.1f} s; {cw.packed_bytes() / 2**20:.1f} MiB of weights")
    if args.out:
        cw.save(args.out)
        _log(f"saved to {args.out}; transcribe with `fxquant transcribe FILE --artifact {args.out}`")
    return 0


def cmd_eval_whisper(args) -> int:
    from .evaluation import VARIANTS, evaluate_whisper, render_rows

    variants = args.variants.split(",") if args.variants else ["fp32", "torch-int8", "ct2-int8", "bits8", "avg4"]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown Whisper variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    rows = evaluate_whisper(args.model, variants, limit=args.limit, fsdd=args.fsdd, log=_log)
    print(render_rows(rows, f"{args.model}: greedy WER on real speech (LJ Speech, FSDD digit sentences)"))
    return 0
