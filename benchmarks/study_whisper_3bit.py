"""Study for issue 11: weight-quantization recipes for the real Whisper tiny.en at <= 3 bits a weight.

Fake quantization: every weight matrix of the fp32 torch model (the two encoder convs, every nn.Linear and
the tied 51864 x 384 token embedding / logits table) is quantized with fxquant's own quantizers
(`fxquant.formats.quantize_weight`) and dequantized in place; the model then transcribes a fixed held-out
subset of LJ Speech (every 3rd clip, the first 60 of those) with the fp32 torch decoding path (activations
stay fp32: the compiled model's int8 activations are not simulated). Calibration (H = sum x x^T of every
layer input) comes from the 32 synthetic English clips shipped in fxquant/data/calibration (never LJ
Speech): the encoder on their windows, the decoder teacher-forced on the fp32 model's transcripts of them.

A recipe is text: `default=u3g64;embed=cb3c:gptq;enc.mlp=u4g64` assigns a format per layer key. Keys (most
specific wins): a module name (e.g. decoder.blocks.3.mlp.2), a glob (e.g. *.cross_attn.query), a group (enc.conv, enc.attn, enc.mlp, dec.self,
dec.cross, dec.mlp, embed), a part (enc, dec) or `default`. Formats: u<b>g<gs> / u<b>c (uniform symmetric,
group of gs or per channel), a<b>g<gs> (uniform asymmetric), cb<b>c / cb<b>g<gs> (k-means codebook), cbt<b>
(one codebook per tensor + a scale per row), cbs<b> (256 codebooks shared by the rows: a table index + a
scale per row; GPTQ keeps the tables, no refit), fp (kept fp32, counted as 32 bits); suffix `:gptq` for GPTQ
rounding (`:gptq@0.1` sets the dampening; `:gptqa` act order, `:gptqr` codebook levels re-solved after
rounding, `:gptqar` both; fxquant.quantizers.gptq), nothing for nearest rounding; a final `+noh`
fits without the calibration importance diag(H) (unweighted k-means / clip search).

Bits per weight are counted over every quantized matrix: codes + a 16-bit scale per (row, group) (the brief's
convention) + 8 bits per level of every codebook table; a second column gives fxquant's exact deployed bytes
(`fxquant.formats.weight_bytes`, fp32 scales) x 8 / weights.

    python benchmarks/study_whisper_3bit.py --name fp32 --recipe default=fp
    python benchmarks/study_whisper_3bit.py --name u3g64-rtn --recipe default=u3g64

Appends one row per run to benchmarks/STUDY-whisper-3bit.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "STUDY-whisper-3bit.md"
CACHE = Path(os.environ.get("FXQUANT_CACHE_DIR", Path.home() / ".cache" / "fxquant")) / "study3bit"
N_EVAL = 60
N_CAL = 32
MAX_TOKENS = 96      # greedy screening: LJ Speech clips (<= 10 s) need well under this


# -- layers -------------------------------------------------------------------------------------------------
def weight_layers(model) -> list[tuple[str, torch.nn.Module]]:
    out = [("encoder.conv1", model.encoder.conv1), ("encoder.conv2", model.encoder.conv2)]
    out += [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    out.append(("decoder.token_embedding", model.decoder.token_embedding))
    return out


def group_of(name: str) -> str:
    if name == "decoder.token_embedding":
        return "embed"
    if name.startswith("encoder.conv"):
        return "enc.conv"
    part = "enc" if name.startswith("encoder.") else "dec"
    if ".cross_attn." in name:
        return "dec.cross"
    if ".attn." in name:
        return f"{part}.attn" if part == "enc" else "dec.self"
    if ".mlp." in name:
        return f"{part}.mlp"
    raise ValueError(name)


# -- calibration statistics -----------------------------------------------------------------------------------
def input_rows(name: str, mod, x: torch.Tensor) -> torch.Tensor:
    from fxquant.quantizers.nodes import conv_rows

    if isinstance(mod, torch.nn.Conv1d):
        return conv_rows(x, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.groups)
    return x.reshape(-1, x.shape[-1]).float()


@torch.no_grad()
def calibration_stats(model, tok, n_clips: int = N_CAL) -> dict[str, tuple[torch.Tensor, int]]:
    """{layer: (H = sum x x^T float64 [K, K], rows)} from the shipped English calibration clips."""
    path = CACHE / f"H-english{n_clips}.pt"
    if path.is_file():
        return torch.load(path)
    from fxquant.asr.calibration_speech import english_waves
    from fxquant.asr.compiled import whisper_calibration

    cal = whisper_calibration(model, tok, english_waves(n_clips))
    stats: dict[str, list] = {}
    hooks = []

    def add(name, rows):
        rows = rows.double()
        h = rows.T @ rows
        if name in stats:
            stats[name][0] += h
            stats[name][1] += rows.shape[0]
        else:
            stats[name] = [h, rows.shape[0]]

    for name, mod in weight_layers(model):
        if name == "decoder.token_embedding":
            continue
        hooks.append(mod.register_forward_hook(lambda m, inp, out, name=name: add(name, input_rows(name, m, inp[0]))))
    hooks.append(model.decoder.ln.register_forward_hook(
        lambda m, inp, out: add("decoder.token_embedding", out.reshape(-1, out.shape[-1]))))
    try:
        for mel, tokens in zip(cal.mels, cal.tokens):
            audio = model.encoder(mel)
            model.decoder.cross_cache(audio)
            model.decoder(tokens[:, :-1], audio)
    finally:
        for h in hooks:
            h.remove()
    out = {k: (v[0], v[1]) for k, v in stats.items()}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def calibration_inputs(model, tok, n_clips: int = N_CAL):
    """(mels, teacher-forcing tokens) of the calibration clips (the fp32 model's transcripts), cached."""
    path = CACHE / f"cal-english{n_clips}.pt"
    if path.is_file():
        return torch.load(path)
    from fxquant.asr.calibration_speech import english_waves
    from fxquant.asr.compiled import whisper_calibration

    cal = whisper_calibration(model, tok, english_waves(n_clips))
    out = (cal.mels, cal.tokens)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


@torch.no_grad()
def collect(model, cal, names: set[str]) -> dict[str, tuple[torch.Tensor, int]]:
    """H and rows of the named layers' inputs, on the model as it is now (e.g. partly quantized)."""
    stats: dict[str, list] = {}
    hooks = []

    def add(name, rows):
        rows = rows.double()
        if name in stats:
            stats[name][0] += rows.T @ rows
            stats[name][1] += rows.shape[0]
        else:
            stats[name] = [rows.T @ rows, rows.shape[0]]

    for name, mod in weight_layers(model):
        if name in names and name != "decoder.token_embedding":
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, name=name: add(name, input_rows(name, m, inp[0]))))
    if "decoder.token_embedding" in names:
        hooks.append(model.decoder.ln.register_forward_hook(
            lambda m, inp, out: add("decoder.token_embedding", out.reshape(-1, out.shape[-1]))))
    encoder_only = all(n.startswith("encoder.") for n in names)
    try:
        for mel, tokens in zip(*cal):
            audio = model.encoder(mel)
            if not encoder_only:
                model.decoder(tokens[:, :-1], audio)
    finally:
        for h in hooks:
            h.remove()
    return {k: (v[0], v[1]) for k, v in stats.items()}


def stages(model) -> list[list[str]]:
    """Sequential quantization order: convs, encoder blocks, the token table, decoder blocks."""
    names = [n for n, _ in weight_layers(model)]
    out = [[n for n in names if n.startswith("encoder.conv")]]
    out += [[n for n in names if n.startswith(f"encoder.blocks.{i}.")] for i in range(len(model.encoder.blocks))]
    out.append(["decoder.token_embedding"])
    out += [[n for n in names if n.startswith(f"decoder.blocks.{i}.")] for i in range(len(model.decoder.blocks))]
    return out


# -- recipes --------------------------------------------------------------------------------------------------
FMT = re.compile(r"^(u|a|cb|cbt|cbs)(\d)(?:(c)|g(\d+))?(?::(gptqa?r?|rtn)(?:@([0-9.e-]+))?)?(\+noh)?$")


def parse_recipe(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(";"):
        if part.strip():
            k, v = part.split("=")
            out[k.strip()] = v.strip()
    if "default" not in out:
        raise SystemExit("recipe needs a default=... entry")
    return out


def spec_for(recipe: dict[str, str], name: str) -> str:
    import fnmatch

    g = group_of(name)
    if name in recipe:
        return recipe[name]
    for key, v in recipe.items():
        if "*" in key and fnmatch.fnmatchcase(name, key):
            return v
    for key in (g, g.split(".")[0], "default"):
        if key in recipe:
            return recipe[key]
    raise KeyError(name)


def decode_spec(spec: str) -> dict | None:
    if spec == "fp":
        return None
    m = FMT.match(spec)
    if not m:
        raise SystemExit(f"bad format {spec!r}")
    kind, bits, chan, gs, rnd, damp, noh = m.groups()
    scheme = "uniform" if kind in ("u", "a") else "codebook"
    gran = "tensor" if kind == "cbt" else "shared" if kind == "cbs" else ("channel" if chan or gs is None else "group")
    return {"scheme": scheme, "bits": int(bits), "granularity": gran, "group_size": int(gs) if gs else None,
            "symmetric": kind != "a", "rounding": rnd or "rtn", "damp": float(damp) if damp else 0.01,
            "shared": kind == "cbs", "use_hdiag": not noh}


def weight_2d(mod) -> torch.Tensor:
    return mod.weight.detach().reshape(mod.weight.shape[0], -1)


def count_bits(d: dict | None, n: int, k: int) -> tuple[float, float]:
    """(bits with 16-bit scales, fxquant weight_bytes * 8) of an [n, k] matrix in this format."""
    from fxquant.formats import weight_bytes

    if d is None:
        return 32.0 * n * k, 32.0 * n * k
    if d["granularity"] == "shared":      # codes + scale + 8-bit table index per row + 256 tables
        t = min(256, n)
        return d["bits"] * n * k + 24 * n + t * (1 << d["bits"]) * 8, \
            d["bits"] * n * k + 40 * n + t * (1 << d["bits"]) * 8
    gs = d["group_size"] if d["granularity"] == "group" else k
    groups = -(-k // gs)
    bits = d["bits"] * n * k + 16 * n * groups
    if d["scheme"] == "codebook":
        tables = 1 if d["granularity"] == "tensor" else n * groups
        bits += tables * (1 << d["bits"]) * 8
    exact = weight_bytes((n, k), d["bits"], d["scheme"], d["granularity"], d["group_size"], d["symmetric"]) * 8
    return bits, exact


def quantize_layer(w: torch.Tensor, d: dict, h: torch.Tensor | None, rows: int) -> torch.Tensor:
    from fxquant.formats import quantize_weight
    from fxquant.qweight import dequantize

    hdiag = None if h is None or not d["use_hdiag"] else (h.diagonal() / max(rows, 1)).float()
    if d["granularity"] == "tensor":        # one codebook per tensor, levels shared, a scale per row
        return quantizers_tensor_codebook(w, d, hdiag)
    if d["granularity"] == "shared":        # 256 codebooks shared by the rows (fxquant.quantizers.codebook)
        from fxquant.quantizers import codebook, gptq

        if d["rounding"].startswith("gptq"):
            codes, grids = gptq.gptq_round(w, (h / max(rows, 1)).float(),
                                           lambda blk: codebook.shared_tables(blk, d["bits"], 256, hdiag)[1],
                                           w.shape[1], damp=d["damp"], refit=False)
            return grids[0].values().gather(1, codes)
        codes, grid = codebook.shared_tables(w, d["bits"], 256, hdiag)
        return grid.values().gather(1, codes)
    if d["rounding"].startswith("gptq"):
        from fxquant import formats as F
        from fxquant.quantizers import gptq

        fmt = F.get_format(d["scheme"])
        k = w.shape[1]
        gs = F.resolve_group_size(d["granularity"], d["group_size"], k)
        starts = iter(range(0, k, gs))

        def fit_block(blk):
            s0 = next(starts)
            wt = None if hdiag is None else hdiag[s0:s0 + blk.shape[1]]
            return fmt.fit(blk, d["bits"], d["symmetric"], wt)

        mode = d["rounding"][4:]
        codes, grids = gptq.gptq_round(w, (h / max(rows, 1)).float(), fit_block, gs, damp=d["damp"],
                                       act_order="a" in mode, refit="r" in mode)
        qw = F._assemble(d["scheme"], d["bits"], d["symmetric"], d["granularity"], gs, codes, F._stack_grids(grids))
    else:
        qw = quantize_weight(w, d["bits"], d["scheme"], d["granularity"], d["group_size"], d["symmetric"],
                             hdiag=hdiag)
    return dequantize(qw)


def quantizers_tensor_codebook(w, d, hdiag):
    """Rows scaled to unit absmax, one shared k-means codebook, nearest rounding (cbt<b>)."""
    from fxquant.quantizers import codebook

    amax = w.abs().amax(1, keepdim=True).clamp(min=1e-12)
    x = (w / amax)
    sample = x.reshape(1, -1)
    wt = None if hdiag is None else hdiag.expand_as(x).reshape(1, -1)
    c = codebook.weighted_kmeans(sample, wt, 1 << d["bits"], iters=20)[0]
    mid = (c[1:] + c[:-1]) / 2
    q = c[torch.searchsorted(mid, x.contiguous())]
    return q * amax


def apply_recipe(model, recipe: dict[str, str], stats, log=print, sequential=None) -> tuple[float, float, list[str]]:
    """Quantize every layer; `sequential` = calibration inputs: H is then re-collected per stage on the model
    with the earlier stages already quantized (GPTQ's sequential mode), else `stats` (fp32 model) is used."""
    total_w = 0
    total_b = total_x = 0.0
    notes = []
    layers = dict(weight_layers(model))
    order = [n for st in stages(model) for n in st]
    stage_of = {n: i for i, st in enumerate(stages(model)) for n in st}
    current = None
    for name in order:
        mod = layers[name]
        if sequential is not None and (current is None or stage_of[name] != current[0]):
            todo = {n for n in stages(model)[stage_of[name]]
                    if decode_spec(spec_for(recipe, n)) is not None}
            current = (stage_of[name], collect(model, sequential, todo) if todo else {})
            stats = current[1]
        d = decode_spec(spec_for(recipe, name))
        w = weight_2d(mod)
        n, k = w.shape
        b, x = count_bits(d, n, k)
        total_w += n * k
        total_b += b
        total_x += x
        if d is None:
            continue
        h, rows = stats.get(name, (None, 0))
        if d["rounding"].startswith("gptq") and rows < 2 * k:
            notes.append(f"{name}: GPTQ on {rows} rows < 2K={2 * k}")
        t0 = time.perf_counter()
        wq = quantize_layer(w.float(), d, h, rows)
        with torch.no_grad():
            mod.weight.copy_(wq.reshape(mod.weight.shape))
        log(f"  {name:42s} {spec_for(recipe, name):14s} {time.perf_counter() - t0:6.1f} s")
    return total_b / total_w, total_x / total_w, notes


@torch.no_grad()
def center_tied_embedding(model) -> None:
    """W <- W - mean over tokens, positional embedding += that mean (see fxquant.quantizers.equalize)."""
    from fxquant.quantizers.equalize import center_rows

    wc, mu = center_rows(model.decoder.token_embedding.weight)
    model.decoder.token_embedding.weight.copy_(wc)
    model.decoder.positional_embedding.add_(mu)


def keep_fp32_use(model, w: torch.Tensor, use: str) -> None:
    """Untie for diagnosis: the `use` ("input" lookup or "logits" projection) reads w instead of the quantized table."""
    import types

    dec = model.decoder
    if use == "input":
        emb = torch.nn.Embedding.from_pretrained(w.clone(), freeze=True)
        wq = dec.token_embedding.weight
        dec.token_embedding = emb
        dec._logits = types.MethodType(lambda self, x: torch.matmul(self.ln(x), wq.t()).float(), dec)
    else:
        dec._logits = types.MethodType(lambda self, x: torch.matmul(self.ln(x), w.t()).float(), dec)


# -- evaluation -----------------------------------------------------------------------------------------------
def eval_set():
    from fxquant.asr.data import ljspeech
    from fxquant.audio import load_audio

    utts = ljspeech()[::3][:N_EVAL]
    return [u.id for u in utts], [load_audio(u.path) for u in utts], [u.text for u in utts]


def transcribe(model, tok, waves, decode: str = "full") -> list[str]:
    """decode "full": the default options (temperature fallback); "greedy": temperature 0 only, at most
    MAX_TOKENS tokens a window (a screening mode: a broken model's loops end early)."""
    from fxquant.asr.decoding import ModelParts
    from fxquant.asr.transcriber import TranscribeOptions, Transcriber

    torch.manual_seed(0)
    opts = TranscribeOptions() if decode == "full" else TranscribeOptions(temperatures=(0.0,), max_tokens=MAX_TOKENS)
    t = Transcriber(ModelParts.from_model(model), tok, opts)
    return [r.text for r in t.transcribe_audio(waves)]


def append_row(row: dict) -> None:
    header = ("| date (UTC) | recipe name | decode | recipe | avg bits (16-bit scales) | avg bits (fxquant bytes) | "
              "WER % (60 LJ clips) | fp32 WER % | delta | seconds | load avg | notes | command |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    if not RESULTS.is_file():
        RESULTS.write_text(
            "# Whisper tiny.en at <= 3 bits a weight: recipe study (issue 11)\n\n"
            "Written by `benchmarks/study_whisper_3bit.py` (see its docstring for the recipe syntax). Fake-quantized "
            "weights of the fp32 torch model, 60 held-out LJ Speech clips (every 3rd clip, first 60), calibration on "
            "the 32 shipped synthetic English clips. Activations fp32. decode: `greedy` = temperature 0 only, <= 96 "
            "tokens a window (screening); `full` = fxquant's default decoding with temperature fallback. Bits count every quantized matrix "
            "(convs, linears, the tied 51864x384 token table).\n\n" + header)
    RESULTS.write_text(RESULTS.read_text() + "| " + " | ".join(str(row[k]) for k in (
        "date", "name", "decode", "recipe", "bits", "bits_exact", "wer", "fp32", "delta", "secs", "load", "notes",
        "command")) + " |\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--sequential", action="store_true",
                    help="re-collect H per stage on the partly quantized model (convs, each encoder block, the "
                         "token table, each decoder block)")
    ap.add_argument("--keep-fp32-use", choices=("input", "logits"), default=None,
                    help="diagnosis only: one use of the tied table reads the unquantized weights")
    ap.add_argument("--center-embed", action="store_true",
                    help="subtract the token table's column mean before quantizing, folded into the positional "
                         "embedding (exact: the logits move by one constant per position)")
    ap.add_argument("--decode", choices=("full", "greedy"), default="greedy",
                    help="greedy: temperature 0, <= 96 tokens a window (screening); full: with fallback")
    args = ap.parse_args()
    from fxquant.models.whisper_ckpt import load_checkpoint
    from fxquant.models.whisper_text import WhisperTokenizer
    from fxquant.textnorm import word_error_rate

    start = time.perf_counter()
    load0 = os.getloadavg()[0]
    ck = load_checkpoint("whisper-tiny.en")
    model = ck.model.eval()
    tok = WhisperTokenizer.from_file(ck.directory / "tokenizer.json")
    recipe = parse_recipe(args.recipe)
    ids, waves, refs = eval_set()
    fp32_file = CACHE / f"fp32-hyps-{args.decode}.txt"
    stats = calibration_stats(model, tok)
    if not fp32_file.is_file():
        hyps = transcribe(model, tok, waves, args.decode)
        fp32_file.write_text("\n".join(hyps))
    fp32 = 100 * word_error_rate(refs, fp32_file.read_text().split("\n"))
    if args.center_embed:
        center_tied_embedding(model)
    cal = calibration_inputs(model, tok) if args.sequential else None
    w_fp32 = model.decoder.token_embedding.weight.detach().clone()
    bits, bits_exact, notes = apply_recipe(model, recipe, stats, sequential=cal)
    if args.keep_fp32_use:
        keep_fp32_use(model, w_fp32, args.keep_fp32_use)
    hyps = transcribe(model, tok, waves, args.decode)
    wer = 100 * word_error_rate(refs, hyps)
    secs = time.perf_counter() - start
    load1 = os.getloadavg()[0]
    name = args.name + (f" ({args.keep_fp32_use} use of the table fp32)" if args.keep_fp32_use else "") + (" (centered table)" if args.center_embed else "") + (" (sequential H)" if args.sequential else "")
    row = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "name": name, "decode": args.decode, "recipe": f"`{args.recipe}`", "bits": f"{bits:.3f}", "bits_exact": f"{bits_exact:.3f}",
           "wer": f"{wer:.2f}", "fp32": f"{fp32:.2f}", "delta": f"{wer - fp32:+.2f}", "secs": f"{secs:.0f}",
           "load": f"{load0:.2f} -> {load1:.2f}", "notes": "; ".join(notes[:3]) + (" ..." if len(notes) > 3 else ""),
           "command": "`python benchmarks/study_whisper_3bit.py " + " ".join(
               f"'{a}'" if ("=" in a or ";" in a) else a for a in sys.argv[1:]) + "`"}
    print(f"{args.name}: avg bits {bits:.3f} (exact {bits_exact:.3f}), WER {wer:.2f}% (fp32 {fp32:.2f}%), {secs:.0f} s")
    for n in notes:
        print("  note:", n)
    (CACHE / f"hyps-{args.name}-{args.decode}.txt").write_text("\n".join(hyps))
    if not args.no_write:
        append_row(row)


if __name__ == "__main__":
    main()
