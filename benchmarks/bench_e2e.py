"""End-to-end Whisper on the fair harness: encoder ms (one 30 s window), decode ms/token, model MiB, peak RSS.

    python benchmarks/bench_e2e.py                                   # whisper-tiny.en + random tiny, base
    python benchmarks/bench_e2e.py --models whisper-tiny.en --quick  # a smaller run
    python benchmarks/bench_e2e.py --load quiet --threads 2,1 --wait-policy passive

Models: zoo names (real weights) or random presets (`tiny`, `base`: speed does not depend on weight values).
Variants: CTranslate2 int8 on the checkpoint folder (intra_threads = the thread count; a random preset uses the
real checkpoint of its size), fxquant W8A8 (int8 cross-attention K/V, the default) and W8A8 with fp32 K/V
(kv_bits=None), avg 4 bits, torch fp32, torch dynamic int8. Real-weight fxquant variants are compiled once
(bits8 / avg4 via fxquant.asr.compiled.cached_compile) and saved under --cache; the worker loads only that
artifact. Every (model, variant, threads) runs in its own process (peak RSS = its ru_maxrss); inside it
--blocks alternate quiet and busy (harness.busy_core), each block --rounds interleaved rounds of the encoder
on a real LJ Speech window and a greedy decode of --tokens tokens with end-of-text suppressed (prefill, steps
and cross cache; fxquant's loop under pool_owns_threads as its transcriber; CTranslate2: `generate` on its
`encode` output with suppress_tokens=[-1, eot], as faster-whisper calls it) divided by the tokens. Writes
benchmarks/E2E-<models>.md and .json: medians [quartiles], loads, ratios vs CTranslate2, busy/quiet, issue 12's goal.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = ("ct2-int8", "fxq-W8A8", "fxq-W8A8-kvf32", "fxq-avg4", "torch-fp32", "torch-int8")
FXQ = {"fxq-W8A8": {"bits": 8}, "fxq-W8A8-kvf32": {"bits": 8, "kv_bits": None}, "fxq-avg4": {"avg_bits": 4.0}}
LABEL = {"fxq-W8A8": "fxq-W8A8 (int8 K/V)", "fxq-W8A8-kvf32": "fxq-W8A8 (fp32 K/V)"}
PEER = {"tiny": "whisper-tiny.en", "base": "whisper-base"}   # real checkpoint of a random preset's size
RANDOM_PROMPT, RANDOM_EOT = [50258, 50259, 50359, 50363], 50257


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="whisper-tiny.en,tiny,base")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--load", default="both", choices=["quiet", "busy", "both"])
    p.add_argument("--threads", default="2", help="thread counts, e.g. 2,1")
    p.add_argument("--wait-policy", choices=["default", "passive", "active"], default="default",
                   help="OMP_WAIT_POLICY for torch, fxquant and CTranslate2 alike (default: unset)")
    p.add_argument("--tokens", type=int, default=0, help="decoded tokens (default 100, --quick 50)")
    p.add_argument("--rounds", type=int, default=0, help="rounds per block (default 5, --quick 3)")
    p.add_argument("--blocks", type=int, default=0, help="alternating quiet/busy blocks (default 2, --quick 1)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--recompile", action="store_true", help="compile the real-weight artifacts again")
    p.add_argument("--cache", default=str(Path(os.environ.get("FXQUANT_CACHE_DIR", Path.home() / ".cache" /
                                                             "fxquant")) / "bench"))
    p.add_argument("--out", default=None, help="results file (default benchmarks/E2E-<models>.md)")
    p.add_argument("--prepare", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, metavar=("PREP", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tokens = args.tokens or (50 if args.quick else 100)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.blocks = args.blocks or (1 if args.quick else 2)
    if not all(t.isdigit() and int(t) > 0 for t in args.threads.split(",")):
        p.error(f"--threads takes positive whole numbers separated by commas, got {args.threads!r}")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    for m in args.models.split(","):
        if m not in PEER and not m.startswith("whisper-"):
            p.error(f"model {m!r}: a zoo name (whisper-tiny.en, whisper-base) or a random preset (tiny, base)")
    return args


# -- prepare (one process per model): features, artifacts, CTranslate2 folder ----------------------------------
def prepare(args) -> None:
    import numpy as np

    from fxquant.asr.data import ljspeech
    from fxquant.asr.transcriber import split_windows
    from fxquant.audio import load_audio
    from fxquant.models.whisper_ckpt import load_checkpoint
    from fxquant.models.whisper_text import WhisperTokenizer

    model, cache = args.prepare, Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    mel = split_windows(load_audio(ljspeech(1)[0].path))[:1].numpy()
    np.save(cache / "mel-lj0.npy", mel)
    ckpt = load_checkpoint(PEER.get(model, model))
    tok = WhisperTokenizer.from_file(ckpt.directory / "tokenizer.json")
    out = {"model": model, "mel": str(cache / "mel-lj0.npy"), "artifacts": {},
           "ct2": {"dir": str(ckpt.directory), "prompt": tok.sot_sequence(language="en" if tok.multilingual else None),
                   "eot": tok.eot, "bytes": _int8_bytes(ckpt.model), "peer": ckpt.name}}
    out.update({"prompt": out["ct2"]["prompt"], "eot": tok.eot} if model not in PEER else
               {"prompt": RANDOM_PROMPT, "eot": RANDOM_EOT})
    for variant in args.variants.split(","):
        if model not in PEER and variant in FXQ:
            out["artifacts"][variant] = str(_artifact(ckpt, variant, cache, args.recompile))
    harness.print_result(out)


def _int8_bytes(model) -> int:
    """CTranslate2 int8's weight bytes, estimated: 1 byte per matrix weight + fp32 row scales + fp32 rest."""
    return sum(p.numel() + 4 * p.shape[0] if p.dim() >= 2 else 4 * p.numel() for p in model.parameters())


def _artifact(ckpt, variant: str, cache: Path, recompile: bool) -> Path:
    """A saved compiled Whisper for `variant`: bits8 / avg4 are the zoo's on-disk cache folders (what users
    load), other variants (e.g. kv_bits=None) are compiled once into the bench cache."""
    import fxquant
    from fxquant.asr.compiled import CompiledWhisper, cached_compile, compile_whisper

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    opts = FXQ[variant]
    if set(opts) <= {"bits", "avg_bits"} and not recompile:   # exactly what `fxquant transcribe --model` loads
        return Path(cached_compile(ckpt, **opts, log=log).directory)
    st = (ckpt.directory / "model.bin").stat() if (ckpt.directory / "model.bin").exists() else None
    src = json.dumps([fxquant.__version__, str(ckpt.directory), st and [st.st_size, st.st_mtime], FXQ[variant]])
    folder = cache / "artifacts" / f"{ckpt.name}-{variant}-{hashlib.sha256(src.encode()).hexdigest()[:12]}"
    if recompile and folder.exists():
        shutil.rmtree(folder)
    if (folder / "whisper.json").is_file():
        return folder
    cw: CompiledWhisper = compile_whisper(ckpt, **opts)
    cw.save(folder)
    return folder


# -- worker (one process per model, variant and thread count) -----------------------------------------------
def _ct2_side(prep: dict, threads: int, tokens: int):
    import ctranslate2
    import numpy as np

    c = prep["ct2"]
    model = ctranslate2.models.Whisper(c["dir"], device="cpu", compute_type="int8", intra_threads=threads)
    mel = ctranslate2.StorageView.from_array(np.load(prep["mel"]))
    audio = model.encode(mel)

    def decode():
        # CTranslate2 4.8 stops after max_length / 2 new tokens with a Whisper prompt (measured)
        r = model.generate(audio, [c["prompt"]], max_length=2 * tokens, beam_size=1,
                           suppress_tokens=[-1, c["eot"]], suppress_blank=False)
        assert len(r[0].sequences_ids[0]) == tokens, f"CTranslate2 generated {len(r[0].sequences_ids[0])} tokens"

    return (lambda: model.encode(mel)), decode, c["bytes"], 0.0


def _torch_side(prep: dict, variant: str, tokens: int):
    import time

    import numpy as np
    import torch

    from fxquant.asr.decoding import ModelParts
    from fxquant.evaluate import dynamic_int8_bytes, torch_dynamic_int8, weight_stats

    mel = torch.from_numpy(np.load(prep["mel"]))
    compile_s = 0.0
    if variant in prep["artifacts"]:
        from fxquant.asr.compiled import CompiledWhisper
        cw = CompiledWhisper.load(prep["artifacts"][variant])
        parts, nbytes = cw.parts(), cw.packed_bytes()
    else:
        from fxquant.models.whisper import DecoderCrossCache, DecoderStep, whisper_random
        from fxquant.models.whisper_ckpt import load_checkpoint
        model = load_checkpoint(prep["model"]).model if prep["model"].startswith("whisper-") else \
            whisper_random(prep["model"], seed=0, std=0.02)
        d = model.dims
        mods = [model.encoder, DecoderCrossCache(model.decoder), DecoderStep(model.decoder)]
        if variant == "torch-int8":
            mods = [torch_dynamic_int8(m) for m in mods]
            nbytes = dynamic_int8_bytes(mods[0])[0] + dynamic_int8_bytes(mods[2])[0]
        elif variant in FXQ:
            import fxquant
            start = time.perf_counter()
            with torch.no_grad():
                audio = model.encoder(mel)
                step_in = (torch.tensor([prep["prompt"]]), model.decoder.cross_cache(audio),
                           model.decoder.empty_cache(1), torch.tensor(0))
            mods = [fxquant.compile_lowbit(m, x, **FXQ[variant]) for m, x in zip(mods, [(mel,), (audio,), step_in])]
            compile_s = time.perf_counter() - start
            nbytes = _packed_bytes(mods)
        else:
            nbytes = weight_stats(model.encoder)[0] + weight_stats(model.decoder)[0]
        parts = ModelParts(*mods, d.n_text_layer, d.n_text_head, d.n_text_state, d.n_text_ctx,
                           kernel_owned_threads=variant in FXQ)
    with torch.no_grad():
        audio = parts.encoder(mel)

    def encoder():
        with torch.no_grad():
            parts.encoder(mel)

    return encoder, lambda: _decode(parts, audio, prep["prompt"], prep["eot"], tokens), nbytes, compile_s


def _packed_bytes(modules) -> int:
    """Weight bytes of compiled parts, tables shared by the step and the cross cache counted once."""
    seen = {}
    for i, cm in enumerate(modules):
        for r in cm.report_rows():
            seen[r.get("weight_id") or f"{i}:{r['node']}"] = r["bytes"]
    return sum(seen.values())


def _decode(parts, audio, prompt: list[int], eot: int, n: int) -> None:
    """Greedy decode of exactly n tokens (end-of-text masked): prompt prefill, then n - 1 single-token steps."""
    import contextlib

    import torch

    if parts.kernel_owned_threads:
        from fxquant.codegen.threadpool import pool_owns_threads
        threads = pool_owns_threads()
    else:
        threads = contextlib.nullcontext()
    with threads, torch.no_grad():
        cross = parts.cross_cache(audio)
        cache = parts.empty_cache(1).to(cross.dtype)
        logits, cache = parts.step(torch.tensor([prompt]), cross, cache, torch.tensor(0))
        for i in range(n):
            row = logits[0, -1].clone()
            row[eot] = float("-inf")
            nxt = int(row.argmax())
            if i < n - 1:
                logits, cache = parts.step(torch.tensor([[nxt]]), cross, cache, torch.tensor(len(prompt) + i))


def worker(args) -> None:
    import resource
    import time

    prep_file, variant = args.worker
    prep = json.loads(Path(prep_file).read_text())
    threads = int(args.threads)
    start = time.perf_counter()
    if variant == "ct2-int8":
        encoder, decode, nbytes, compile_s = _ct2_side(prep, threads, args.tokens)
    else:
        import torch
        torch.set_num_threads(threads)
        encoder, decode, nbytes, compile_s = _torch_side(prep, variant, args.tokens)
    setup_s = time.perf_counter() - start
    loads = {"quiet": [False], "busy": [True], "both": [False, True]}[args.load]
    runs = harness.alternating({"encoder": encoder, "decode": decode}, threads, loads, args.blocks, args.rounds,
                               torch_threads=variant != "ct2-int8")
    harness.print_result({
        "variant": variant, "threads": threads, "model_bytes": nbytes, "compile_s": compile_s, "setup_s": setup_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "runs": {("busy" if busy else "quiet"): {
            "encoder": harness.Stats.of(r["samples"]["encoder"]), "conditions": r["conditions"],
            "decode": harness.Stats.of([t / args.tokens for t in r["samples"]["decode"]])} for busy, r in runs.items()}})


# -- parent: run the workers, write the tables -----------------------------------------------------------------
def main(args) -> None:
    from tabulate import tabulate

    cache, threads_list = Path(args.cache), [int(t) for t in args.threads.split(",")]
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--variants", args.variants, "--cache", args.cache, "--tokens", str(args.tokens), "--rounds",
              str(args.rounds), "--blocks", str(args.blocks), "--load", args.load]
    results = []                     # (model, result)
    for model in args.models.split(","):
        print(f"{model}: preparing (features, compiled artifacts) ...", file=sys.stderr, flush=True)
        prep = harness.run_child([*me, "--prepare", model, *common] + (["--recompile"] if args.recompile else []))
        prep_file = cache / f"prep-{model}.json"
        prep_file.write_text(json.dumps(prep.result()))
        for threads in threads_list:
            for variant in args.variants.split(","):
                child = harness.run_child([*me, "--worker", str(prep_file), variant, "--threads", str(threads),
                                           *common])
                try:
                    r = child.result()
                except RuntimeError as exc:
                    print(f"{model} {variant} {threads}t: {exc}", file=sys.stderr)
                    continue
                results.append((model, r))
                print(f"{model} {variant} {threads}t: " + "; ".join(
                    f"{k} enc {v['encoder']['median_us'] / 1e3:.0f} ms dec {v['decode']['median_us'] / 1e3:.2f}"
                    f" ms/tok" for k, v in r["runs"].items()), file=sys.stderr, flush=True)
    text, data = report(args, results, tabulate)
    print(text)
    out = Path(args.out) if args.out else HERE / f"E2E-{args.models.replace(',', '-')}.md"
    harness.write_results(out, text, data)


def report(args, results, tabulate) -> tuple[str, dict]:
    def med(r, load, part):
        return r["runs"][load][part]["median_us"] / 1e3

    def cell(r, load, part, digits):
        return harness.Stats(**r["runs"][load][part]).cell(digits, 1e-3)

    key = {(m, r["variant"], r["threads"]): r for m, r in results}
    rows, ratio_rows, goal_rows, conds = [], [], [], {}
    for m, r in results:
        ct2 = key.get((m, "ct2-int8", r["threads"]))
        for load, run in r["runs"].items():
            for c in run["conditions"]:
                first = conds.setdefault((r["threads"], load), dict(c, wait_policy=dict(c["wait_policy"])))
                first["load_after"] = c["load_after"]
                first["wait_policy"].update(c["wait_policy"])   # the CTranslate2 worker has no fxquant pool
            vs = [f"{med(ct2, load, p) / med(r, load, p):.2f}x" if ct2 and load in ct2["runs"] else ""
                  for p in ("encoder", "decode")]
            rows.append([m, LABEL.get(r["variant"], r["variant"]), r["threads"], load, cell(r, load, "encoder", 0),
                         cell(r, load, "decode", 2), f"{r['model_bytes'] / 2**20:.1f}", f"{r['peak_rss_mib']:.0f}",
                         *vs, f"{r['compile_s']:.0f}" if r["compile_s"] else ""])
        if {"quiet", "busy"} <= set(r["runs"]):
            bq = [med(r, "busy", p) / med(r, "quiet", p) for p in ("encoder", "decode")]
            ratio_rows.append([m, LABEL.get(r["variant"], r["variant"]), r["threads"], f"{bq[0]:.2f}", f"{bq[1]:.2f}"])
            if m.startswith("whisper-") and r["variant"] in FXQ and ct2 and "busy" in ct2["runs"]:
                for p, name in (("encoder", "encoder ms"), ("decode", "decode ms/token")):
                    ours, peer = med(r, "busy", p), med(ct2, "busy", p)
                    ok = bq[p == "decode"] <= 2 and ours <= peer
                    goal_rows.append([m, LABEL.get(r["variant"], r["variant"]), r["threads"], name,
                                      f"busy <= 2x quiet and <= CT2 busy ({peer:.2f})",
                                      f"{ours:.2f} ({bq[p == 'decode']:.2f}x quiet)", "yes" if ok else "no"])
    conditions = [harness.Condition(**c) for c in conds.values()]
    text = harness.header("End-to-end Whisper benchmark (fair harness)", conditions,
                          times="Times in ms: medians of interleaved rounds, [first-third quartile] beside them.")
    text += (f"\nBatch 1; encoder = one 30 s window (LJ Speech LJ001-0001); decode = {args.tokens} greedy tokens "
             f"(end-of-text suppressed; prefill + steps + cross cache) / {args.tokens}; times in ms, median "
             f"[quartiles] of {args.blocks} block(s) x {args.rounds} rounds per load; each row its own "
             f"process (peak RSS = its ru_maxrss). `busy` = one busy-loop process on one core. vs CT2 = CTranslate2 "
             f"int8 time / this time at the same model, threads and load (> 1: faster than CTranslate2); random "
             f"presets are compared with CTranslate2 on the real checkpoint of their size (" +
             ", ".join(f"{k}: {v}" for k, v in PEER.items()) + "). CTranslate2 model MiB: int8 weights + fp32 "
             f"scales and vectors, estimated from the checkpoint's tensors (its model.bin is float16). "
             f"\"compile s\": random-weight fxquant variants compile in the worker, so their peak RSS includes the "
             f"compile (real-weight rows load a saved artifact).\n\n")
    text += tabulate(rows, ["model", "variant", "threads", "load", "encoder ms", "decode ms/token", "model MiB",
                            "peak RSS MiB", "encoder vs CT2", "decode vs CT2", "compile s"], tablefmt="github")
    text += "\n\n## Effect of one busy core (median busy / median quiet)\n\n"
    text += tabulate(ratio_rows, ["model", "variant", "threads", "encoder busy/quiet", "decode busy/quiet"],
                     tablefmt="github") if ratio_rows else "(needs --load both)"
    text += "\n\n## Issue 12 goal: one core busy, real weights (ms)\n\n"
    text += tabulate(goal_rows, ["model", "variant", "threads", "figure", "goal", "measured", "met"],
                     tablefmt="github") if goal_rows else "(needs --load both, a real model and ct2-int8)"
    return text + "\n", {"machine": harness.machine(), "args": vars(args), "results": results}


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = ARGS.wait_policy  # before torch / CTranslate2 load their OpenMP
    if ARGS.prepare:
        prepare(ARGS)
    elif ARGS.worker:
        worker(ARGS)
    else:
        main(ARGS)
