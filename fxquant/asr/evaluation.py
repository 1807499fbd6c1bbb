"""Word error rate of Whisper variants on real speech (LJ Speech, FSDD digit sentences).

Variants: "openai-fp32" (openai-whisper's own decode on the same weights, when installed), "fp32"
(fxquant's Whisper, no quantization), "torch-int8" (torch dynamic int8 of the fp32 model),
"ct2-int8" (CTranslate2 int8 on the same checkpoint folder, when installed), and compiled
precisions "bits8", "bits4", "avg4", "avg3" (see fxquant.asr.compiled.precision_key). Each row
has WER per set, weight bytes, resident memory growth and seconds of compute per second of audio.
Both sides of every WER go through the same English normaliser (fxquant.textnorm).

Example:
    >>> rows = evaluate_whisper("whisper-tiny.en", ["fp32", "bits8"], limit=20)   # doctest: +SKIP
    >>> print(render_rows(rows))                                                 # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import torch

from fxquant.errors import FxQuantError

from .data import Utterance, fsdd_sentences, ljspeech

__all__ = ["EvalResult", "VARIANTS", "build_transcriber", "evaluate_whisper", "evaluate_waves", "render_rows",
           "scoring_sets"]

VARIANTS = ("openai-fp32", "fp32", "torch-int8", "ct2-int8", "bits8", "bits4", "avg4", "avg3")


@dataclasses.dataclass
class EvalResult:
    variant: str
    wer: dict[str, float]                 # set name -> WER in percent
    hyps: dict[str, list[str]]
    model_bytes: int | None
    resident_mib: float
    rtf: float                            # compute seconds per second of audio
    note: str = ""


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def scoring_sets(limit: int | None = None, fsdd: int = 60) -> dict[str, list[Utterance]]:
    """LJ Speech (all 186 unless `limit`) and `fsdd` FSDD test-take digit sentences."""
    sets = {"ljspeech": ljspeech(limit)}
    if fsdd:
        sets["fsdd"] = fsdd_sentences(fsdd, split="test", seed=0)
    return sets


def _load_wave(u: Utterance) -> torch.Tensor:
    from fxquant.audio import load_audio

    return u.wave if u.wave is not None else load_audio(u.path)


def _digits_apart(text: str) -> str:
    """FSDD sentences are digits spoken one by one: '371' (or '3-7-1') is scored as 'three seven one'."""
    from fxquant.datasets import DIGIT_WORDS

    return "".join(f" {DIGIT_WORDS[int(c)]} " if c.isdigit() else c for c in text)


def build_transcriber(ckpt, variant: str, log=print) -> tuple[Callable[[list[torch.Tensor]], list[str]], int | None]:
    """(transcribe(waves) -> texts, weight bytes) for one variant of a loaded checkpoint."""
    from fxquant.models.whisper_text import WhisperTokenizer

    from .compiled import cached_compile
    from .decoding import ModelParts
    from .transcriber import Transcriber

    tok = WhisperTokenizer.from_file(ckpt.directory / "tokenizer.json")
    fp32_bytes = sum(p.numel() * 4 for p in ckpt.model.parameters())
    if variant == "fp32":
        t = Transcriber(ModelParts.from_model(ckpt.model), tok)
        return (lambda waves: [r.text for r in t.transcribe_audio(waves)]), fp32_bytes
    if variant == "torch-int8":
        from fxquant.evaluate import dynamic_int8_bytes, torch_dynamic_int8

        q = torch_dynamic_int8(ckpt.model)
        t = Transcriber(ModelParts.from_model(q), tok)
        return (lambda waves: [r.text for r in t.transcribe_audio(waves)]), dynamic_int8_bytes(q)[0]
    if variant == "openai-fp32":
        return _openai_transcriber(ckpt), fp32_bytes
    if variant == "ct2-int8":
        return _ct2_transcriber(ckpt, tok), None
    if variant.startswith("bits") or variant.startswith("avg"):
        bits = int(variant[4:]) if variant.startswith("bits") else None
        avg = float(variant[3:]) if variant.startswith("avg") else None
        cw = cached_compile(ckpt, bits=bits, avg_bits=avg, log=log)
        t = Transcriber(cw.parts(), tok)
        return (lambda waves: [r.text for r in t.transcribe_audio(waves)]), cw.packed_bytes()
    raise ValueError(f"unknown Whisper variant {variant!r}; choose from {VARIANTS}")


def _openai_transcriber(ckpt):
    import whisper  # openai-whisper
    from whisper.model import ModelDimensions as ODims, Whisper as OWhisper

    model = OWhisper(ODims(**dataclasses.asdict(ckpt.model.dims)))
    model.load_state_dict(ckpt.model.state_dict(), strict=False)
    model.eval()
    opts = whisper.DecodingOptions(language="en", without_timestamps=True,
                                   fp16=False)

    def run(waves):
        out = []
        for w in waves:
            mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(w.float()), model.dims.n_mels)
            out.append(whisper.decode(model, mel, opts).text)
        return out

    return run


def _ct2_transcriber(ckpt, tok):
    import ctranslate2

    from .transcriber import split_windows

    model = ctranslate2.models.Whisper(str(ckpt.directory), device="cpu", compute_type="int8",
                                       intra_threads=torch.get_num_threads())
    prompt = tok.sot_sequence(language="en" if tok.multilingual else None)

    def run(waves):
        out = []
        for w in waves:
            texts = []
            for mel in split_windows(w):
                feats = ctranslate2.StorageView.from_array(mel[None].contiguous().numpy())
                r = model.generate(feats, [prompt], beam_size=1, max_length=448, suppress_blank=True,
                                   suppress_tokens=[-1])
                texts.append(tok.decode(r[0].sequences_ids[0]).strip())
            out.append(" ".join(t for t in texts if t))
        return out

    return run


def evaluate_whisper(model: str, variants: Sequence[str], limit: int | None = None, fsdd: int = 60,
                     log=print) -> list[EvalResult]:
    """Score each variant on LJ Speech (and FSDD digit sentences); see `evaluate_waves`."""
    sets = scoring_sets(limit, fsdd)
    data = {name: ([_load_wave(u) for u in utts], [u.text for u in utts]) for name, utts in sets.items()}
    return evaluate_waves(model, variants, data, log=log)


def evaluate_waves(model: str, variants: Sequence[str], data: dict[str, tuple[list, list[str]]],
                   log=print) -> list[EvalResult]:
    """Score each variant on {set name: (16 kHz waves, reference texts)}; variants are built in turn."""
    from fxquant.models.whisper_ckpt import load_checkpoint
    from fxquant.textnorm import word_error_rate

    ckpt = load_checkpoint(model)
    waves = {name: ws for name, (ws, _) in data.items()}
    refs = {name: rs for name, (_, rs) in data.items()}
    audio_s = sum(w.numel() for ws in waves.values() for w in ws) / 16000
    rows = []
    for variant in variants:
        rss0 = _rss_mib()
        try:
            run, nbytes = build_transcriber(ckpt, variant, log=log)
        except ImportError as exc:
            log(f"{variant}: skipped ({exc})")
            rows.append(EvalResult(variant, {}, {}, None, 0.0, 0.0, note=f"not installed: {exc.name}"))
            continue
        except FxQuantError as exc:       # e.g. a budget this model cannot meet: report it, keep the other rows
            log(f"{variant}: cannot be built ({exc})")
            rows.append(EvalResult(variant, {}, {}, None, 0.0, 0.0, note="cannot be built"))
            continue
        start = time.perf_counter()
        hyps = {name: run(ws) for name, ws in waves.items()}
        rtf = (time.perf_counter() - start) / audio_s
        wer = {name: 100 * word_error_rate(refs[name], [_digits_apart(h) for h in hyps[name]]
                                           if name == "fsdd" else hyps[name]) for name in data}
        rows.append(EvalResult(variant, wer, hyps, nbytes, _rss_mib() - rss0, rtf))
        log(f"{variant}: " + ", ".join(f"{k} WER {v:.2f}%" for k, v in wer.items()) + f", RTF {rtf:.3f}")
    return rows


def render_rows(rows: Sequence[EvalResult], title: str = "") -> str:
    """A table a person reads: WER per set and the delta against fxquant fp32."""
    from tabulate import tabulate

    sets = sorted({k for r in rows for k in r.wer})
    base = next((r for r in rows if r.variant == "fp32"), None)
    table = []
    for r in rows:
        row = [r.variant]
        for s in sets:
            if s in r.wer:
                delta = f" ({r.wer[s] - base.wer[s]:+.2f})" if base and s in base.wer and r is not base else ""
                row.append(f"{r.wer[s]:.2f}{delta}")
            else:
                row.append(r.note or "-")
        row += [f"{r.model_bytes / 2**20:.1f}" if r.model_bytes else "-", f"{r.resident_mib:.0f}",
                f"{r.rtf:.3f}" if r.rtf else "-"]
        table.append(row)
    headers = ["variant"] + [f"WER % {s}" for s in sets] + ["weights MiB", "resident +MiB", "s per s audio"]
    return (title + "\n" if title else "") + tabulate(table, headers=headers, tablefmt="github")
