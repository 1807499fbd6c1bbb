"""End-to-end Whisper-architecture speed: encoder over 30 s of audio and a 100-token greedy decode.

    python benchmarks/bench_e2e.py                       # tiny and base, every variant (about 15 min)
    python benchmarks/bench_e2e.py --models tiny --quick # a smaller run

Variants, all at batch 1 with the same thread count (default 2), each in its own process so peak RSS
is its own: torch fp32, torch dynamic int8 (quantize_dynamic, fbgemm), CTranslate2 int8 (optional:
`pip install ctranslate2 transformers`; a random-weight transformers Whisper of the same size converted
with its converter), and fxquant at W8A8, mixed 4 bits and mixed 3 bits. Random weights are fine for
speed. Prints medians and ratios; writes the table to benchmarks/E2E-<models>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROMPT = [50258, 50259, 50359, 50363]      # sot, en, transcribe, notimestamps
EOT = 50257
VARIANTS = ("torch-fp32", "torch-int8", "ct2-int8", "fxq-W8A8", "fxq-mixed-4", "fxq-mixed-3")
FXQ = {"fxq-W8A8": {"bits": 8}, "fxq-mixed-4": {"avg_bits": 4.0}, "fxq-mixed-3": {"avg_bits": 3.0}}


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _module_bytes(module) -> int:
    from fxquant.evaluate import dynamic_int8_bytes, weight_stats

    if any(hasattr(m, "_packed_params") for m in module.modules()):
        return dynamic_int8_bytes(module)[0]
    return weight_stats(module)[0]


def run_torch_or_fxq(preset: str, variant: str, tokens: int, reps: int) -> dict:
    import fxquant
    from fxquant.evaluate import torch_dynamic_int8
    from fxquant.models.whisper import DecoderCrossCache, DecoderStep, greedy_decode, whisper_random

    model = whisper_random(preset, seed=0, std=0.02)
    mel = torch.randn(1, model.dims.n_mels, 2 * model.dims.n_audio_ctx)
    encoder, cross, step = model.encoder, DecoderCrossCache(model.decoder), DecoderStep(model.decoder)
    compile_s = 0.0
    if variant == "torch-int8":
        encoder, cross, step = (torch_dynamic_int8(m) for m in (encoder, cross, step))
    elif variant in FXQ:
        start = time.perf_counter()
        with torch.no_grad():
            audio = model.encoder(mel)
            kv = model.decoder.cross_cache(audio)
        step_inputs = (torch.tensor([PROMPT]), kv, model.decoder.empty_cache(1), torch.tensor(0))
        encoder = fxquant.compile_lowbit(model.encoder, (mel,), **FXQ[variant])
        cross = fxquant.compile_lowbit(cross, (audio,), **FXQ[variant])
        step = fxquant.compile_lowbit(step, step_inputs, **FXQ[variant])
        compile_s = time.perf_counter() - start
    with torch.no_grad():
        encoder(mel)  # warm up
        enc = _median_time(lambda: encoder(mel), reps)

        def decode():
            out = greedy_decode(model, mel, PROMPT, tokens, eot=-1, encoder=lambda m: audio_cached,
                                cross_cache=cross, step=lambda t, c, s, o: step(t, c, s, torch.as_tensor(o)))
            assert len(out) == tokens, f"decoded {len(out)} tokens, expected {tokens}"

        audio_cached = encoder(mel)
        decode()
        dec = _median_time(decode, reps)
    size = _module_bytes(encoder) + _decoder_bytes(model, step, cross, variant)
    return {"encoder_ms": 1e3 * enc, "decode_ms_per_token": 1e3 * dec / tokens, "model_bytes": size,
            "compile_s": compile_s}


def _decoder_bytes(model, step, cross, variant: str) -> int:
    """Decoder bytes counted once even though the step and cross-cache modules share parameters."""
    if variant == "torch-fp32":
        return _module_bytes(model.decoder)
    if variant == "torch-int8":
        return _module_bytes(step)  # DecoderStep wraps the whole (quantized) decoder
    return _module_bytes(step) + sum(r["bytes"] for r in cross.report_rows())


def _ct2_model(preset: str, cache: Path):
    import ctranslate2
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    from ctranslate2.converters import TransformersConverter

    from fxquant.models.whisper import PRESETS

    d = PRESETS[preset]
    out = cache / f"ct2-whisper-{preset}-int8"
    if not (out / "model.bin").exists():
        torch.manual_seed(0)
        cfg = WhisperConfig(vocab_size=d.n_vocab, num_mel_bins=d.n_mels, encoder_layers=d.n_audio_layer,
                            decoder_layers=d.n_text_layer, d_model=d.n_audio_state,
                            encoder_attention_heads=d.n_audio_head, decoder_attention_heads=d.n_text_head,
                            encoder_ffn_dim=4 * d.n_audio_state, decoder_ffn_dim=4 * d.n_text_state,
                            max_source_positions=d.n_audio_ctx, max_target_positions=d.n_text_ctx)
        hf = cache / f"hf-whisper-{preset}"
        WhisperForConditionalGeneration(cfg).save_pretrained(hf)
        TransformersConverter(str(hf)).convert(str(out), quantization="int8", force=True)
        vocab = [f"tok{i}" for i in range(d.n_vocab)]  # random weights: only the special tokens matter
        specials = {EOT: "<|endoftext|>", 50258: "<|startoftranscript|>", 50259: "<|en|>", 50358: "<|translate|>",
                    50359: "<|transcribe|>", 50360: "<|startoflm|>", 50361: "<|startofprev|>",
                    50362: "<|nospeech|>", 50363: "<|notimestamps|>"}
        for i, s in specials.items():
            vocab[i] = s
        (out / "vocabulary.json").write_text(json.dumps(vocab))
    threads = torch.get_num_threads()
    return ctranslate2.models.Whisper(str(out), device="cpu", compute_type="int8", intra_threads=threads), out


def run_ct2(preset: str, tokens: int, reps: int, cache: Path) -> dict:
    import ctranslate2
    import numpy as np

    from fxquant.models.whisper import PRESETS

    model, path = _ct2_model(preset, cache)
    d = PRESETS[preset]
    mel = ctranslate2.StorageView.from_array(np.random.default_rng(0).standard_normal(
        (1, d.n_mels, 2 * d.n_audio_ctx)).astype(np.float32))
    model.encode(mel)
    enc = _median_time(lambda: model.encode(mel), reps)

    def generate():
        # measured here: CTranslate2 4.8 stops after max_length / 2 new tokens with this prompt
        r = model.generate(mel, [PROMPT], max_length=2 * tokens, beam_size=1, suppress_tokens=[EOT],
                           suppress_blank=False)
        n = len(r[0].sequences_ids[0])
        assert n == tokens, f"CTranslate2 generated {n} tokens, expected {tokens}"

    generate()
    gen = _median_time(generate, reps)
    return {"encoder_ms": 1e3 * enc, "decode_ms_per_token": 1e3 * (gen - enc) / tokens,
            "model_bytes": (path / "model.bin").stat().st_size, "compile_s": 0.0}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    if args.variant == "ct2-int8":
        result = run_ct2(args.models, args.tokens, args.reps, Path(args.cache))
    else:
        result = run_torch_or_fxq(args.models, args.variant, args.tokens, args.reps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,base")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="3 reps, 50 tokens")
    p.add_argument("--cache", default=str(Path(os.environ.get("FXQUANT_CACHE_DIR", Path.home() / ".cache" / "fxquant"))
                                         / "bench"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.reps, args.tokens = 3, 50
    if args.worker:
        return worker(args)
    from tabulate import tabulate

    Path(args.cache).mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in args.models.split(","):
        results = {}
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--worker", "--models", preset, "--variant", variant, "--tokens",
                   str(args.tokens), "--reps", str(args.reps), "--threads", str(args.threads), "--cache", args.cache]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{preset} {variant}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[variant] = json.loads(line[7:])
            print(f"{preset} {variant}: {results[variant]}", file=sys.stderr)
        base = results.get("ct2-int8") or results.get("torch-int8")
        fp32 = results.get("torch-fp32")
        for variant, r in results.items():
            rows.append([preset, variant, f"{r['encoder_ms']:.0f}", f"{r['decode_ms_per_token']:.2f}",
                         f"{r['model_bytes'] / 2**20:.1f}", f"{r['peak_rss_mb']:.0f}",
                         f"{base['encoder_ms'] / r['encoder_ms']:.2f}x" if base else "",
                         f"{base['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x" if base else "",
                         f"{fp32['model_bytes'] / r['model_bytes']:.1f}x" if fp32 else ""])
    ref = "CTranslate2 int8" if "ct2-int8" in args.variants else "torch int8"
    table = tabulate(rows, headers=["model", "variant", "encoder ms (30 s)", "decode ms/token", "model MiB",
                                    "peak RSS MiB", f"encoder vs {ref}", f"decode vs {ref}", "smaller than fp32"],
                     tablefmt="github")
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()} "
              f"({_cpu_name()}), {args.threads} threads, torch {torch.__version__}, batch 1, "
              f"{args.tokens} decoded tokens, medians of {args.reps} runs.\n\n")
    print(table)
    out = HERE / f"E2E-{args.models.replace(',', '-')}.md"
    out.write_text(f"# End-to-end Whisper benchmark\n\n`python benchmarks/bench_e2e.py {' '.join(sys.argv[1:])}`\n\n"
                   + header + table + "\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
