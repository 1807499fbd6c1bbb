"""Batched Whisper decoding on the KV-cached step: suppression rules, no-speech probability, sampling.

`decode_windows` turns a batch of 30 s log-mel windows into token lists. It follows openai-whisper's
decoding rules without timestamps: the prompt is the tokenizer's start-of-transcript sequence; blank and
end-of-text are suppressed at the first sampled position; the non-speech symbols and the special task
tokens are suppressed everywhere; the no-speech probability is read at the start-of-transcript position;
a result carries its summed log-probability and zlib compression ratio, which `transcriber` uses for the
temperature fallback that stops repetition loops. The encoder, cross-cache and step callables can be
fp32 modules or compiled ones; everything here is plain torch.

Example:
    >>> parts = ModelParts.from_model(model)                                   # doctest: +SKIP
    >>> results = decode_windows(parts, tokenizer, mels, DecodeOptions())      # doctest: +SKIP
    >>> results[0].tokens[:3]                                                  # doctest: +SKIP
    [383, 3329, 1110]
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["DecodeOptions", "DecodeResult", "ModelParts", "DecodeScratch", "decode_windows", "compression_ratio"]


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings (openai-whisper's defaults for transcription without timestamps)."""

    temperature: float = 0.0
    max_tokens: int | None = None        # default: half the text context (224), as openai-whisper
    best_of: int = 5                     # samples per window when temperature > 0
    suppress_blank: bool = True
    language: str | None = "en"          # multilingual checkpoints: forced language
    seed: int = 0                        # sampling is reproducible


@dataclasses.dataclass
class DecodeResult:
    tokens: list[int]
    sum_logprob: float
    no_speech_prob: float
    temperature: float
    text: str = ""

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / (len(self.tokens) + 1)   # +1: the end-of-text token, as openai-whisper


@dataclasses.dataclass
class ModelParts:
    """The three callables a cached decode needs, plus the cache geometry.

    encoder(mel (B, n_mels, 3000)) -> audio (B, A, D); cross_cache(audio) -> (B, n_layer, 2, H, A, dh);
    step(tokens (B, L), cross, self_kv, offset) -> (logits (B, L, V), self_kv), writing self_kv in place.
    """

    encoder: Callable
    cross_cache: Callable
    step: Callable
    n_layer: int
    n_head: int
    n_state: int
    n_text_ctx: int
    kernel_owned_threads: bool = False   # compiled parts: the decode loop runs torch's glue ops on one thread

    @classmethod
    def from_model(cls, model) -> "ModelParts":
        """The fp32 parts of an fxquant Whisper (fxquant.models.whisper.Whisper)."""
        d = model.dims
        return cls(model.encoder, model.decoder.cross_cache, model.decoder.step, d.n_text_layer, d.n_text_head,
                   d.n_text_state, d.n_text_ctx)

    def empty_cache(self, batch: int, scratch: "DecodeScratch | None" = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A zeroed self-attention cache (B, n_layer, 2, H, n_text_ctx, dh), as TextDecoder.empty_cache
        (in `scratch`'s reused memory when given)."""
        shape = (batch, self.n_layer, 2, self.n_head, self.n_text_ctx, self.n_state // self.n_head)
        if scratch is None:
            return torch.zeros(shape, dtype=dtype)
        return scratch.tensor("self_kv", shape, dtype).zero_()

    def cross_kv(self, audio: torch.Tensor, scratch: "DecodeScratch | None" = None) -> torch.Tensor | tuple:
        """cross_cache(audio) (B, n_layer, 2, H, A, dh). Compiled parts with a scratch compute it one window at
        a time into the scratch's reused memory: the same values (the kernels treat rows independently), but
        no batch-sized temporaries. For a batch of 8 tiny.en windows the graph's own way allocates 330 MiB
        (the projections' output, two rounds of stacking) that the first write faults in page by page: 220 ms
        a batch, against about 50 ms one window at a time. fp32 parts keep the batched call. A compiled step
        that takes the cache as int8 rows gets (codes, scales) instead (`_cross_int8`)."""
        _forget_constant_kv(self.step)
        if 1 in getattr(getattr(self.step, "input_spec", None), "row_inputs", ()):
            return self._cross_int8(audio, scratch)
        if scratch is None or not self.kernel_owned_threads or audio.shape[0] == 1:
            return self.cross_cache(audio)
        first = self.cross_cache(audio[:1])
        out = scratch.tensor("cross_kv", (audio.shape[0], *first.shape[1:]), first.dtype)
        out[:1].copy_(first)
        del first
        for i in range(1, audio.shape[0]):
            out[i:i + 1].copy_(self.cross_cache(audio[i:i + 1]))
        return out

    def _cross_int8(self, audio: torch.Tensor, scratch: "DecodeScratch | None") -> tuple[torch.Tensor, torch.Tensor]:
        """The cross cache as (int8 codes, float32 row scales), for a compiled step that takes it so (pass
        int8-kv-inputs): computed one window at a time and converted into the batch's buffers, so only one
        window's float32 cache exists at a time. Whisper tiny.en, 8 windows: 37 MiB of codes instead of a
        147 MiB float32 cache (beside which the step kept the same 37 MiB as its int8 copy)."""
        first = self.cross_cache(audio[:1])
        shape = (audio.shape[0], *first.shape[1:])
        make = scratch.tensor if scratch is not None else lambda _, size, dtype: torch.empty(size, dtype=dtype)
        codes, scales = make("cross_codes", shape, torch.int8), make("cross_scales", (*shape[:-1], 1), torch.float32)
        for i in range(audio.shape[0]):
            window = first if i == 0 else self.cross_cache(audio[i:i + 1])
            first = None
            self.step.int8_rows(window, out=(codes[i:i + 1], scales[i:i + 1]))
            del window
        return codes, scales


def _forget_constant_kv(step) -> None:
    """Release the int8 copies a compiled step keeps of the previous cross keys / values (FusedAttention, and
    the module's conversions of float inputs it takes as int8 rows)."""
    if callable(getattr(step, "forget_inputs", None)):
        step.forget_inputs()
    modules = getattr(step, "modules", None)
    for m in modules() if callable(modules) else ():
        if callable(getattr(m, "forget_constant_kv", None)):
            m.forget_constant_kv()


class DecodeScratch:
    """Memory reused by the batches of one transcription (the cross and self-attention caches).

    A fresh tensor of tens of MiB is mapped from the OS and faults in on first write, 4 KiB at a time
    (about 2.5 us a page on the machine of benchmarks/TRANSCRIBE-*.md: 45 ms for one 73 MiB batch cache);
    reused memory costs nothing. A tensor handed out stays valid until the next request of the same name:
    a decode asks once per batch, after the previous batch is done. Writing into it bumps its version
    counter, so FusedAttention's per-tensor int8 memo sees new contents.

    Example:
        >>> s = DecodeScratch()
        >>> a = s.tensor("x", (2, 3)); b = s.tensor("x", (1, 3))
        >>> a.data_ptr() == b.data_ptr(), b.shape
        (True, torch.Size([1, 3]))
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised contiguous tensor of `shape`, in memory kept from earlier requests when it fits."""
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            self._buffers.pop(name, None)          # free the old one before taking the new one
            buf = self._buffers[name] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


MIN_LOOP_REPEATS = 4   # a tail of at least this many copies of one n-gram is a repetition loop


def loop_start(tokens: Sequence[int], max_ngram: int = 8) -> int | None:
    """Where a trailing repetition loop should be cut (after its first copy), or None: a tail that repeats
    one n-gram (n <= max_ngram) at least MIN_LOOP_REPEATS times, a partial last copy included.

    Example:
        >>> loop_start([5, 6, 7, 1, 1, 1, 1, 1])
        4
        >>> loop_start([5, 8, 9, 8, 9, 8, 9, 8, 9, 8]), loop_start([1, 2, 3, 4])
        (3, None)
    """
    tokens = list(tokens)
    best = None
    for n in range(1, max_ngram + 1):
        start = len(tokens) - n                  # the tail from `start` on has period n
        while start > 0 and tokens[start - 1] == tokens[start - 1 + n]:
            start -= 1
        if start >= 0 and len(tokens) - start >= MIN_LOOP_REPEATS * n and (best is None or start + n < best):
            best = start + n
    return best


def compression_ratio(text: str) -> float:
    """len(utf-8 bytes) / len(zlib-compressed bytes): high for repetition loops (openai-whisper's measure)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _suppressed(tokenizer) -> torch.Tensor:
    ids = set(tokenizer.non_speech_tokens())
    ids.update([tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev, tokenizer.sot_lm,
                tokenizer.no_speech])
    return torch.tensor(sorted(i for i in ids if i is not None and i >= 0), dtype=torch.long)


def _suppress_masks(vocab: int, suppress: torch.Tensor, blank: torch.Tensor | None) -> list[torch.Tensor]:
    """Boolean (vocab,) masks of the suppressed tokens: [first position, later positions] (one mask when
    blank is not suppressed at the first position)."""
    later = torch.zeros(vocab, dtype=torch.bool)
    later[suppress] = True
    if blank is None:
        return [later]
    first = later.clone()
    first[blank] = True
    return [first, later]


@torch.no_grad()
def decode_windows(parts: ModelParts, tokenizer, mels: torch.Tensor, options: DecodeOptions = DecodeOptions(),
                   audio: torch.Tensor | None = None, scratch: DecodeScratch | None = None) -> list[DecodeResult]:
    """Decode a batch of log-mel windows (B, n_mels, 3000); one DecodeResult per window.

    With temperature > 0 each window is sampled `best_of` times in one batch and the most likely
    sample (mean log-probability) is kept. `audio` (the encoder output) may be passed to skip the encoder.
    `scratch` (a DecodeScratch) lets consecutive calls reuse the caches' memory.
    """
    if mels.dim() != 3:
        raise ValueError(f"decode_windows expects mel windows (B, n_mels, frames), got {tuple(mels.shape)}")
    n = mels.shape[0]
    repeat = options.best_of if options.temperature > 0 else 1
    audio = parts.encoder(mels) if audio is None else audio
    if repeat > 1:
        audio = audio.repeat_interleave(repeat, dim=0)
    with kernel_thread_policy(parts):
        results = _decode(parts, tokenizer, audio, options, scratch)
    if repeat == 1:
        return results
    best = []
    for i in range(n):
        group = results[i * repeat:(i + 1) * repeat]
        best.append(max(group, key=lambda r: r.avg_logprob))
    return best


def kernel_thread_policy(parts: ModelParts):
    """For compiled parts, torch's many small glue ops per token run on one thread while fxquant's kernels
    keep every thread: torch's OpenMP workers would otherwise spin (or wait for a preempted worker) at every
    op, which costs more than the ops on a busy machine. fp32 parts keep torch's settings."""
    if not parts.kernel_owned_threads:
        return contextlib.nullcontext()
    from fxquant.codegen.threadpool import pool_owns_threads

    return pool_owns_threads()


def _decode(parts: ModelParts, tokenizer, audio: torch.Tensor, options: DecodeOptions,
            scratch: DecodeScratch | None = None) -> list[DecodeResult]:
    batch = audio.shape[0]
    prompt = tokenizer.sot_sequence(language=options.language if tokenizer.multilingual else None)
    sot_index = prompt.index(tokenizer.sot)
    max_tokens = options.max_tokens or parts.n_text_ctx // 2
    max_tokens = min(max_tokens, parts.n_text_ctx - len(prompt))
    suppress = _suppressed(tokenizer)
    blank = torch.tensor(tokenizer.encode(" ") + [tokenizer.eot], dtype=torch.long)
    gen = torch.Generator().manual_seed(options.seed)
    cross = parts.cross_kv(audio, scratch)
    cache = parts.empty_cache(batch, scratch, cross[1].dtype if isinstance(cross, tuple) else cross.dtype)
    logits, cache = parts.step(torch.tensor([prompt] * batch), cross, cache, torch.tensor(0))
    no_speech = logits[:, sot_index].float().softmax(-1)[:, tokenizer.no_speech].tolist()
    eot = tokenizer.eot
    out = torch.empty(batch, 0, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    sum_logprob = torch.zeros(batch, dtype=torch.float64)
    masks = _suppress_masks(logits.shape[-1], suppress, blank if options.suppress_blank else None)
    for i in range(max_tokens):
        # one out-of-place masked_fill instead of clone + index_put (what the rules suppress becomes -inf)
        last = logits[:, -1].float().masked_fill(masks[min(i, len(masks) - 1)], float("-inf"))
        if options.temperature > 0:
            probs = F.softmax(last / options.temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
        else:  # numpy's argmax: the same first maximum (a NaN counts as the maximum), ~10x faster than torch's here
            nxt = torch.from_numpy(last.numpy().argmax(-1)).long()
        logprobs = F.log_softmax(last, dim=-1)
        chosen = logprobs.gather(1, nxt[:, None])[:, 0].double()
        sum_logprob += torch.where(done, torch.zeros_like(chosen), chosen)
        nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
        done |= nxt == eot
        out = torch.cat([out, nxt[:, None]], dim=1)
        if bool(done.all()) or i == max_tokens - 1:
            break
        logits, cache = parts.step(nxt[:, None], cross, cache, torch.tensor(len(prompt) + i))
    results = []
    for b in range(batch):
        row = out[b].tolist()
        tokens = row[:row.index(eot)] if eot in row else row
        results.append(DecodeResult(tokens=tokens, sum_logprob=float(sum_logprob[b]), no_speech_prob=no_speech[b],
                                    temperature=options.temperature, text=tokenizer.decode(tokens)))
    return results


def batched(items: Sequence, size: int):
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
