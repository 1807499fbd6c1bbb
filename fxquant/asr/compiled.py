"""Compile a real Whisper checkpoint for transcription, save it, load it, cache it on disk.

A Whisper model is three compiled graphs: the encoder, the cross-attention key/value cache (once per
window) and the KV-cached decoder step (once per token). They are calibrated on real speech that is
never scored (FSDD training takes, see `fxquant.asr.data`); the decoder step is calibrated
teacher-forced on the fp32 model's own transcripts of that audio, so every position of a real
transcript is seen. `precision_key` names a precision the CLI accepts: "fp32", "bits8", "avg4", ...

Example:
    >>> ckpt = load_checkpoint("whisper-tiny.en")                          # doctest: +SKIP
    >>> cw = compile_whisper(ckpt, bits=8)                                  # doctest: +SKIP
    >>> cw.save("out/tiny-w8"); cw2 = CompiledWhisper.load("out/tiny-w8")   # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from fxquant.errors import ArtifactError, ConfigError

from .decoding import ModelParts

__all__ = ["CompiledWhisper", "compile_whisper", "precision_key", "whisper_calibration", "cached_compile"]

FORMAT = "fxquant-whisper/1"
PARTS = ("encoder", "cross", "step")


def precision_key(bits: int | None = None, avg_bits: float | None = None) -> str:
    """A short stable name of a precision: 'fp32', 'bits8', 'avg4', 'avg3.5'."""
    if bits is not None and avg_bits is not None:
        raise ConfigError("give bits or avg_bits, not both")
    if bits is not None:
        return f"bits{int(bits)}"
    if avg_bits is not None:
        return f"avg{float(avg_bits):g}"
    return "fp32"


@dataclasses.dataclass
class WhisperCalibration:
    mels: list[torch.Tensor]          # (1, n_mels, 3000) windows
    audio: list[torch.Tensor]         # fp32 encoder outputs
    cross: list[torch.Tensor]         # fp32 cross caches
    tokens: list[torch.Tensor]        # (1, L) prompt + fp32 transcript (teacher forcing)
    packed: "WhisperCalibration | None" = None   # one window packed with the clips (pack_clips), same fields


# Under a budget the decoder's layers (not its token table) keep >= 3 bits: the per-layer KL the solver adds up
# misses how 2-bit decoder layers compound (fake-quantized, 2-bit self-attention or cross-attention queries
# alone cost +15 / +20 WER points, benchmarks/STUDY-whisper-3bit.md). tiny.en avg 3 bits, 186 LJ Speech
# clips: 5.86 % WER without the floor (the solver put one decoder q/k/v and one cross query at 2 bits),
# 4.49 % with it (fp32 3.43 %).
DECODER_MIN_BITS = 3

PACK_SECONDS = 28.0   # pack_clips fills a 30 s window up to here (Whisper's own windows end near speech too)
PACK_GAP_SECONDS = 0.5


def pack_clips(waves: list[torch.Tensor], sample_rate: int = 16000) -> torch.Tensor:
    """The first clips, in order, joined by PACK_GAP_SECONDS of silence while they fit in PACK_SECONDS (at
    least one clip): one 30 s window of speech instead of several mostly silent ones. The encoder's
    sensitivity sweep measures on it: a calibration clip fills a few seconds of its window, the rest is
    padding the encoder still computes.

    Example:
        >>> pack_clips([torch.ones(16000 * 10)] * 4).shape[0] / 16000     # two 10 s clips and a gap
        20.5
    """
    gap = torch.zeros(int(PACK_GAP_SECONDS * sample_rate))
    out, total = [], 0
    for w in waves:
        if out and total + gap.numel() + w.numel() > PACK_SECONDS * sample_rate:
            break
        out += [gap, w] if out else [w]
        total += w.numel() + (gap.numel() if len(out) > 1 else 0)
    return torch.cat(out)


@torch.no_grad()
def whisper_calibration(model, tokenizer, waves: list[torch.Tensor]) -> WhisperCalibration:
    """Run the fp32 model on calibration audio; keep what each compiled part is calibrated on."""
    from .decoding import DecodeOptions, decode_windows
    from .transcriber import split_windows

    parts = ModelParts.from_model(model)
    mels = [split_windows(w)[:1] for w in waves]
    audio = [model.encoder(m) for m in mels]
    cross = [model.decoder.cross_cache(a) for a in audio]
    prompt = tokenizer.sot_sequence(language="en" if tokenizer.multilingual else None)
    results = decode_windows(parts, tokenizer, torch.cat(mels), DecodeOptions(), audio=torch.cat(audio))
    tokens = [torch.tensor([prompt + r.tokens + [tokenizer.eot]]) for r in results]   # one batch: B=len(waves)
    return WhisperCalibration(mels, audio, cross, tokens)


@torch.no_grad()
def with_packed_window(cal: WhisperCalibration, model, tokenizer, waves: list[torch.Tensor]) -> WhisperCalibration:
    """cal with `packed`: the calibration of one window packed with the calibration clips (pack_clips)."""
    return dataclasses.replace(cal, packed=whisper_calibration(model, tokenizer, [pack_clips(waves)]))


class CompiledWhisper:
    """Compiled encoder / cross-cache / step of one Whisper checkpoint at one precision."""

    def __init__(self, encoder, cross, step, dims, tokenizer_file: Path, name: str, precision: str,
                 compile_seconds: float = 0.0):
        self.encoder, self.cross, self.step = encoder, cross, step
        self.dims = dims
        self.tokenizer_file = Path(tokenizer_file)
        self.name = name
        self.precision = precision
        self.compile_seconds = compile_seconds
        self.directory: Path | None = None       # the artifact folder, once saved or loaded

    def parts(self) -> ModelParts:
        d = self.dims
        return ModelParts(self.encoder, self.cross, self.step, d.n_text_layer, d.n_text_head, d.n_text_state,
                          d.n_text_ctx, kernel_owned_threads=True)

    def modules(self) -> dict[str, Any]:
        return {"encoder": self.encoder, "cross": self.cross, "step": self.step}

    def packed_bytes(self) -> int:
        """Weight bytes of the three parts; the step and cross cache share the decoder's tables once."""
        seen: dict[str, int] = {}
        for part, cm in self.modules().items():
            for r in cm.report_rows():
                key = r.get("weight_id") or f"{part}:{r['node']}"
                seen[key] = r["bytes"]
        return sum(seen.values())

    def report(self) -> str:
        return "\n\n".join(f"== {part} ==\n{cm.report()}" for part, cm in self.modules().items())

    # -- artifact ------------------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """Write the three part artifacts, the tokenizer and whisper.json; replaces an old one atomically."""
        from fxquant.artifact_files import staged_dir

        directory = Path(directory)
        with staged_dir(directory, check=_check_destination) as tmp:
            for part, cm in self.modules().items():
                cm.save(tmp / part)
            shutil.copyfile(self.tokenizer_file, tmp / "tokenizer.json")
            meta = {"format": FORMAT, "name": self.name, "precision": self.precision,
                    "dims": dataclasses.asdict(self.dims),
                    "tokenizer_sha256": hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest()}
            (tmp / "whisper.json").write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory, target: str | None = None) -> "CompiledWhisper":
        """Load a saved Whisper artifact (whisper.json is validated; parts load through fxquant.load)."""
        import fxquant
        from fxquant.models.whisper import ModelDimensions

        directory = Path(directory)
        meta_file = directory / "whisper.json"
        if not meta_file.is_file():
            raise ArtifactError(f"{directory} is not an fxquant Whisper artifact (no whisper.json); compile one "
                                f"with `fxquant compile whisper-tiny.en --bits 8 --out DIR`")
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            dims = meta["dims"]
            fields = {f.name for f in dataclasses.fields(ModelDimensions)}
            if set(dims) != fields or not all(isinstance(v, int) and 0 < v < 1_000_000 for v in dims.values()):
                raise ValueError("dims must be positive integers for every ModelDimensions field")
            name, precision = str(meta["name"])[:200], str(meta["precision"])[:50]
            tok = directory / "tokenizer.json"
            if hashlib.sha256(tok.read_bytes()).hexdigest() != meta["tokenizer_sha256"]:
                raise ValueError("tokenizer.json does not match its recorded checksum")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"{directory}: corrupt Whisper artifact ({exc}); compile it again") from exc
        parts = [fxquant.load(directory / p, target=target) if target else fxquant.load(directory / p)
                 for p in PARTS]
        cw = cls(*parts, ModelDimensions(**dims), tok, name, precision)
        cw.directory = directory      # where it was loaded from (fxquant.asr.cache_index records it)
        return cw


def _check_destination(directory: Path) -> None:
    """Only nothing, an empty folder or an older Whisper artifact may be replaced."""
    if directory.is_symlink() or directory.is_file():
        raise ArtifactError(f"{directory} is a file or a link; save the Whisper artifact to a new or empty folder")
    if directory.exists() and any(directory.iterdir()) and not (directory / "whisper.json").is_file():
        raise ArtifactError(f"{directory} exists and is not an fxquant Whisper artifact; choose an empty or "
                            f"new folder")


def centered_token_table(model):
    """A copy of a Whisper whose tied token table W is stored centered, W - mu (mu = its mean row), with mu
    folded into the decoder's positional embedding: token embeddings are unchanged and every logit moves by
    one constant per position (h . mu), which softmax, argmax, log-probabilities and the no-speech probability
    ignore (fxquant.quantizers.equalize). The caller's model is not modified. `compile_whisper(center_table=True)`.

    On by default under a budget (with the row-block table, `compile_whisper`): in tiny.en mu holds 83 % of
    the table's energy, which low-bit rows otherwise spend their levels on. Measured on the 186 LJ Speech
    clips, tiny.en avg 3 bits with the row-block table: 10.78 % WER uncentered, 5.86 % centered; with the
    fake-quantized table alone (the decoder step's block formats of that uncentered compile, fp32
    activations), 6.95 % uncentered and 3.55 % centered (fp32: 3.43 %).

    Example:
        >>> from fxquant.models.whisper import whisper_random
        >>> m = whisper_random("tiny", seed=0)
        >>> c = centered_token_table(m)
        >>> float(c.decoder.token_embedding.weight.mean(0).abs().max()) < 1e-6, c is not m
        (True, True)
    """
    import copy

    from fxquant.quantizers.equalize import center_rows

    out = copy.deepcopy(model)
    dec = out.decoder
    with torch.no_grad():
        centered, mu = center_rows(dec.token_embedding.weight)
        dec.token_embedding.weight.copy_(centered)
        dec.positional_embedding.add_(mu)
    return out


def compile_whisper(ckpt, bits: int | None = None, avg_bits: float | None = None,
                    calibration_waves: list[torch.Tensor] | None = None, target: str = "native",
                    log=None, center_table: bool | None = None, split_table: bool | None = None,
                    decoder_min_bits: int | None = DECODER_MIN_BITS, **options: Any) -> CompiledWhisper:
    """Compile the encoder, cross cache and decoder step of a WhisperCheckpoint at one precision.

    `bits` / `avg_bits` and `options` are compile_lowbit's (rules by module name inside each part:
    "blocks.0.mlp.0" in the encoder, "decoder.blocks.0.attn.query" in the step and cross cache).
    `log` (e.g. print) receives one line per compile phase with its time. `split_table`: hold the tied token
    table as row blocks (`fxquant.models.token_blocks`) so that the budget picks a format per block;
    `center_table`: quantize the centered token table (`centered_token_table`). None (the default) does
    both when a budget (avg_bits / budget_bytes) is given, neither at a uniform width. `decoder_min_bits`:
    under a budget, the narrowest width of the decoder's layers (cross cache and step, not the token table;
    None: no floor; see DECODER_MIN_BITS).
    """
    import fxquant
    from fxquant.models.whisper import DecoderCrossCache, DecoderStep
    from fxquant.models.whisper_text import WhisperTokenizer

    from .data import budget_english, calibration_waves as default_waves
    from .joint import compile_jointly          # torch.export and the pass manager: only when compiling

    start = time.perf_counter()
    log = log or (lambda *a: None)
    budget = avg_bits is not None or options.get("budget_bytes") is not None
    split = split_table if split_table is not None else budget
    centered = split if center_table is None else center_table
    model = centered_token_table(ckpt.model) if centered else ckpt.model
    tokenizer_file = ckpt.directory / "tokenizer.json"
    tok = WhisperTokenizer.from_file(tokenizer_file)
    if split:
        from fxquant.models.token_blocks import split_token_table, whisper_row_blocks

        starts = whisper_row_blocks(model.dims.n_vocab, tok.eot, tok.timestamp_begin)
        model = split_token_table(model, starts, copy_model=not centered)   # a centered model is a copy already
        log(f"token table held as {len(starts) - 1} row blocks (rows {starts}): one format per block")
    waves = calibration_waves or default_waves(english=budget_english(budget))
    cal = whisper_calibration(model, tok, waves)
    if _packed_sweep(avg_bits):
        cal = with_packed_window(cal, model, tok, waves)
    log(f"calibration audio through the fp32 model in {time.perf_counter() - start:.1f} s")
    empty = lambda: model.decoder.empty_cache(1)  # noqa: E731 - a fresh cache per calibration item
    step_cal = [(t, c, empty(), torch.tensor(0)) for t, c in zip(cal.tokens, cal.cross)]
    specs = [("encoder", model.encoder, [(m,) for m in cal.mels]),
             ("cross", DecoderCrossCache(model.decoder), [(a,) for a in cal.audio]),
             ("step", DecoderStep(model.decoder), step_cal)]
    if budget:
        floor = {"decoder.blocks.*": {"min_bits": decoder_min_bits}} if decoder_min_bits else None
        enc, cross, step = compile_jointly(_joint_parts(model, cal, specs, floor),
                                           avg_bits=avg_bits, target=target, log=log, **options)
    else:
        common = dict(bits=bits if bits is not None or options.get("rules") else 8, target=target, **options)
        enc, cross, step = (fxquant.compile_lowbit(mod, batch_of_two(items[0]), calibration=items, **common)
                            for _, mod, items in specs)
    return CompiledWhisper(enc, cross, step, model.dims, tokenizer_file, ckpt.name,
                           precision_key(bits, avg_bits), time.perf_counter() - start)


def _packed_sweep(avg_bits: float | None) -> bool:
    """Under the anchored sweep (budgets >= 4 bits) the encoder's candidates are measured on one window packed
    with calibration clips (pack_clips) instead of two clips' own windows, which was half of a tiny.en avg 4
    compile (each measurement re-runs the encoder below the layer and the fp32 decoder readout). Below, every
    candidate is measured on the compile's max_batches (4) windows. tiny.en avg 4 on the 186 LJ Speech clips:
    3.89 % WER on two windows, 3.77 % packed; measuring the cross cache and decoder step on the packed window
    too (instead of four windows) gave 4.02 %, so they keep theirs."""
    from fxquant.sensitivity_estimate import ANCHORED_MIN_BITS

    return avg_bits is not None and avg_bits >= ANCHORED_MIN_BITS


def _joint_parts(model, cal: WhisperCalibration, specs, decoder_rules: dict | None = None) -> list:
    """PartSpecs whose readouts turn each part's output into teacher-forced fp32 decoder logits."""
    from .joint import PartSpec

    def logits(tokens, cross):
        return model.decoder.step(tokens, cross, model.decoder.empty_cache(tokens.shape[0]), torch.tensor(0))[0]

    enc_cal = cal.packed or cal          # the encoder's sweep measures on the packed window when there is one
    rich = richest_text_first(cal.tokens)
    readouts = {"encoder": lambda out, i: logits(enc_cal.tokens[i], model.decoder.cross_cache(out)),
                "cross": lambda out, i: logits(cal.tokens[rich[i]], out),
                "step": lambda out, i: out[0]}
    own = {"encoder": [(m,) for m in cal.packed.mels]} if cal.packed is not None else {}
    own.update({name: [items[i] for i in rich] for name, _, items in specs if name in ("cross", "step")})
    return [PartSpec(name, mod, batch_of_two(items[0]), items, readouts[name], sensitivity_inputs=own.get(name),
                     rules=decoder_rules if name != "encoder" else None)
            for name, mod, items in specs]


def richest_text_first(tokens: list[torch.Tensor]) -> list[int]:
    """Calibration item indices, most distinct transcript tokens first (ties in order): the decoder-side
    parts (cross cache, step) measure their sensitivity on the first max_batches of these, so the KL sees
    varied English text rather than digit strings, whose ten words cannot tell which rows of the token table
    matter. tiny.en avg 3 bits, 186 LJ Speech clips, with the decoder floor (DECODER_MIN_BITS): 5.05 % WER
    measured on the first four items (two English, two FSDD), 4.49 % on the four richest (English); without
    the floor it measured the other way (5.51 % / 5.86 %): both are within the solver's noise there.

    >>> richest_text_first([torch.tensor([[1, 2, 2]]), torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 5]])])
    [1, 0, 2]
    """
    return sorted(range(len(tokens)), key=lambda i: (-len(set(tokens[i].flatten().tolist())), i))


def batch_of_two(example: tuple) -> tuple:
    """The example inputs with batch 2 (every tensor with a batch axis repeated): torch.export fixes an
    axis of size 1, and the compiled parts must take any batch size."""
    return tuple(t.repeat(2, *[1] * (t.dim() - 1)) if isinstance(t, torch.Tensor) and t.dim() else t
                 for t in example)


def cached_compile(ckpt, bits: int | None = None, avg_bits: float | None = None, cache: Path | None = None,
                   log=print) -> CompiledWhisper:
    """compile_whisper with an on-disk cache keyed by checkpoint, precision and fxquant version."""
    import fxquant
    from fxquant.codegen import cache_dir

    from .data import budget_english, calibration_recipe

    key_src = json.dumps({"name": ckpt.name, "fingerprint": _fingerprint(ckpt), "precision":
                          precision_key(bits, avg_bits), "version": fxquant.__version__})
    recipe = calibration_recipe(english=budget_english(avg_bits is not None))
    if recipe != "fsdd8":            # the default calibration keeps the key of artifacts compiled before
        key_src += recipe
    if _packed_sweep(avg_bits):      # anchored sweep, the encoder measured on one packed window
        key_src += f"|sweep=anchors,encoder=packed{PACK_SECONDS:g}s"
    key_src += "|cross=int8-rows"    # the step takes the cross cache as int8 rows (pass int8-kv-inputs)
    if avg_bits is not None:         # compile_whisper splits the token table under a budget
        key_src += f"|table=rowblocks,centered|decoder>={DECODER_MIN_BITS}|sensitivity=richest-text"
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    root = Path(cache) if cache else Path(cache_dir()) / "whisper"
    folder = root / f"{ckpt.name}-{precision_key(bits, avg_bits)}-{key}"
    if (folder / "whisper.json").is_file():
        try:
            start = time.perf_counter()
            cw = CompiledWhisper.load(folder)
            log(f"loaded compiled {ckpt.name} ({cw.precision}) from {folder} in {time.perf_counter() - start:.1f} s")
            return cw
        except ArtifactError as exc:
            log(f"cached artifact unusable ({exc}); compiling again")
    log(f"compiling {ckpt.name} at {precision_key(bits, avg_bits)} (once; cached in {folder}) ...")
    cw = compile_whisper(ckpt, bits=bits, avg_bits=avg_bits, log=log)
    log(f"compiled in {cw.compile_seconds:.1f} s")
    cw.save(folder)
    cw.directory = folder
    return cw


def _fingerprint(ckpt) -> str:
    h = hashlib.sha256()
    for name, p in sorted(ckpt.model.state_dict().items()):
        h.update(name.encode())
        flat = p.detach().reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 64)][:64].numpy().tobytes())   # a sample: cheap and distinct
    return h.hexdigest()[:16]
