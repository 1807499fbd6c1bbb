"""Word error rate and keyword accuracy of fp32, torch dynamic int8 and fxquant variants, in one table.

Used by `fxquant eval MODEL`, `fxquant demo` and the accuracy benchmarks.

Example:
    >>> rows = evaluate_digits(n_strings=40, variants=["fp32", "W8A8", "mixed-3.0"])   # doctest: +SKIP
    >>> print(render(rows))                                                            # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tabulate import tabulate
from torch import nn

from .progress import Progress
from .runtime import tensor_bytes

# fxquant variant name -> compile_lowbit keyword arguments
FXQUANT_VARIANTS: dict[str, dict] = {
    "W8A8": {"bits": 8},
    "W4": {"bits": 4},
    "mixed-4.0": {"avg_bits": 4.0},
    "mixed-3.0": {"avg_bits": 3.0},
    "mixed-2.5": {"avg_bits": 2.5},
}
BASELINES = ("fp32", "torch-int8")
DEFAULT_VARIANTS = ("fp32", "torch-int8", "W8A8", "W4", "mixed-3.0", "mixed-2.5")


@dataclass
class EvalRow:
    variant: str
    error: float                 # WER (digits) or 1 - accuracy (keywords), in [0, 1]
    model_bytes: int
    avg_bits: float
    ms_per_audio_s: float
    compile_s: float = 0.0
    metric: str = "WER"
    samples: list = field(default_factory=list)
    note: str = ""               # set when the variant could not be built (the other rows still count)


def torch_dynamic_int8(model: nn.Module) -> nn.Module:
    """torch's own dynamic int8 (fbgemm): quantizes nn.Linear (and LSTM) layers only."""
    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear, nn.LSTM}, dtype=torch.qint8)


def dynamic_int8_bytes(qmodel: nn.Module) -> tuple[int, float]:
    """(bytes, average weight bits) of a quantize_dynamic model: int8 Linear weights + float rest."""
    total, bits_params, params = 0, 0.0, 0
    for mod in qmodel.modules():
        if hasattr(mod, "_packed_params") and hasattr(mod, "weight") and callable(mod.weight):
            w = mod.weight()
            n = w.numel()
            total += n + 4 * w.shape[0] + (mod.bias().numel() * 4 if mod.bias() is not None else 0)
            bits_params, params = bits_params + 8 * n, params + n
            continue
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None and t.is_floating_point():
                total += t.numel() * t.element_size()
                if name == "weight" and isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                    bits_params, params = bits_params + 32 * t.numel(), params + t.numel()
    return total, (bits_params / params if params else 32.0)


def weight_stats(module: nn.Module) -> tuple[int, float]:
    """(bytes, average weight bits over conv/linear weights) of an fp32 or fxquant-compiled module."""
    if hasattr(module, "summary"):
        s = module.summary()
        return s["model_bytes"], s["avg_weight_bits"]
    params = sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)))
    return tensor_bytes(module), 32.0 if params else 0.0


def build_variant(name: str, model: nn.Module, example: tuple, calibration: list[tuple],
                  target: str = "native", progress: bool = False) -> tuple[nn.Module, float]:
    """(module, compile seconds) for a variant name."""
    import fxquant

    start = time.perf_counter()
    if name == "fp32":
        return model, 0.0
    if name == "torch-int8":
        return torch_dynamic_int8(model), time.perf_counter() - start
    if name not in FXQUANT_VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {list(BASELINES) + list(FXQUANT_VARIANTS)}")
    cm = fxquant.compile_lowbit(model, example, calibration=calibration, target=target, progress=progress,
                                **FXQUANT_VARIANTS[name])
    return cm, time.perf_counter() - start


def timed_latency(fn: Callable[[torch.Tensor], object], inputs: Sequence[torch.Tensor], seconds_of_audio: float,
                  repeats: int = 3) -> float:
    """Median over `repeats` of total forward time, in ms per second of audio."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for x in inputs:
                fn(x)
            times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2] / seconds_of_audio


def evaluate_digits(n_strings: int = 300, variants: Sequence[str] = DEFAULT_VARIANTS, n_calibration: int = 32,
                    n_latency: int = 20, target: str = "native", progress: bool = True) -> list[EvalRow]:
    """WER of each variant of the digit recognizer on the fixed FSDD test strings (needs ../shared)."""
    import random

    from .datasets import DigitStringBuilder, digit_test_set

    tests = digit_test_set(n_strings)
    builder = DigitStringBuilder("train")
    rng = random.Random(1234)
    calib_waves = [builder.sample(rng, augment=False)[0] for _ in range(n_calibration)]
    return evaluate_digit_variants([w for w, _ in tests], [r for _, r in tests], calib_waves, variants,
                                   n_latency, target, progress)


def evaluate_digit_variants(waves: Sequence[torch.Tensor], refs: Sequence[list[str]], calib_waves: Sequence[torch.Tensor],
                            variants: Sequence[str] = DEFAULT_VARIANTS, n_latency: int = 20, target: str = "native",
                            progress: bool = True) -> list[EvalRow]:
    """WER, bytes, bits and latency of each variant on given 16 kHz utterances and reference words."""
    from .models import digits as dg
    from .wer import wer

    model = dg.load_digits_model()
    calibration = [(dg.batch_features(calib_waves[i:i + 8], model.config)[0],) for i in range(0, len(calib_waves), 8)]
    example = (calibration[0][0][:2],)
    lat_inputs = [dg.features(w, model.config)[None] for w in waves[:n_latency]]
    lat_audio = sum(w.numel() for w in waves[:n_latency]) / 16000
    rows = []
    bar = Progress("compile + transcribe", len(variants), progress)
    bar.step(0)
    for i, name in enumerate(variants):
        built = _build_or_skip(name, model, example, calibration, target, rows, "WER")
        if built is None:
            continue
        module, compile_s = built
        hyps = dg.transcribe_batch(module, list(waves), model.config)
        size, bits = dynamic_int8_bytes(module) if name == "torch-int8" else weight_stats(module)
        rows.append(EvalRow(name, wer(refs, hyps), size, bits, timed_latency(module, lat_inputs, lat_audio),
                            compile_s, "WER", list(zip(refs, hyps))))
        bar.step(i + 1)
    return rows


def _build_or_skip(name, model, example, calibration, target, rows: list, metric: str):
    """build_variant, or a row marked 'cannot be built' (e.g. a budget below the model's smallest size),
    so that the rows already measured are kept and printed."""
    from .errors import FxQuantError

    try:
        return build_variant(name, model, example, calibration, target)
    except FxQuantError as exc:
        rows.append(EvalRow(name, float("nan"), 0, float("nan"), float("nan"), 0.0, metric,
                            note=f"cannot be built: {str(exc).splitlines()[0][:120]}"))
        return None


def render(rows: Sequence[EvalRow], title: str = "") -> str:
    """One table: error metric, bytes, ratio to fp32, average bits, latency, compile time."""
    fp32 = next((r.model_bytes for r in rows if r.variant == "fp32" and not r.note), None)
    body = []
    for r in rows:
        if r.note:
            body.append([r.variant, r.note, "", "", "", "", ""])
            continue
        body.append([r.variant, f"{100 * r.error:.2f} %", f"{r.model_bytes / 1024:.1f} KiB",
                     f"{fp32 / r.model_bytes:.2f}x" if fp32 else "", f"{r.avg_bits:.2f}",
                     f"{r.ms_per_audio_s:.2f}", f"{r.compile_s:.1f}"])
    metric = rows[0].metric if rows else "error"
    table = tabulate(body, headers=["variant", metric, "model bytes", "smaller", "avg weight bits",
                                    "ms per s audio", "compile s"], tablefmt="github")
    notes = ""
    if any(r.variant == "torch-int8" and r.model_bytes == fp32 for r in rows):
        notes = ("\ntorch-int8 = torch.ao quantize_dynamic, which quantizes only nn.Linear/LSTM layers; "
                 "this model has none, so it stays fp32.")
    return (title + "\n" if title else "") + table + notes


def evaluate_keywords(variants: Sequence[str] = DEFAULT_VARIANTS, split: str = "all", n_calibration: int = 256,
                      target: str = "native", progress: bool = True) -> list[EvalRow]:
    """Keyword accuracy of BC-ResNet variants on FSDD clips (needs ../shared); error = 1 - accuracy."""
    from .models import bcresnet as bc

    model = bc.load_bcresnet()
    calib_feats, _ = bc.fsdd_features("train")
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(calib_feats), generator=g)[:n_calibration]
    calibration = [(calib_feats[pick[i:i + 64]],) for i in range(0, n_calibration, 64)]
    example = (calibration[0][0][:2],)
    feats, _ = bc.fsdd_features(split)
    lat_inputs = [feats[i:i + 1] for i in range(20)]
    rows = []
    bar = Progress("evaluate", len(variants), progress)
    for i, name in enumerate(variants):
        built = _build_or_skip(name, model, example, calibration, target, rows, "keyword error")
        if built is None:
            continue
        module, compile_s = built
        correct, total = bc.keyword_accuracy(module, split)
        size, bits = dynamic_int8_bytes(module) if name == "torch-int8" else weight_stats(module)
        rows.append(EvalRow(name, 1 - correct / total, size, bits, timed_latency(module, lat_inputs, 20.0),
                            compile_s, "keyword error"))
        bar.step(i + 1)
    return rows
