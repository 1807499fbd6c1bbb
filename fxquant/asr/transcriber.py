"""Transcribe audio with a Whisper model (fp32 or compiled): 30 s windows, batching, fallback, no-speech.

Long audio is cut into consecutive 30 s windows (no timestamps, no conditioning on the previous
window, so a repetition loop cannot spread). Windows from several files are batched through the
encoder and the decoder. A window whose greedy result looks like a loop (compression ratio > 2.4) or
is unlikely (mean log-probability < -1) is decoded again at temperatures 0.2 ... 1.0, as openai-whisper
does; a window the model judges silent (no-speech probability > 0.6 and mean log-probability < -1)
gives no text.

Example:
    >>> t = Transcriber.from_checkpoint(load_checkpoint("whisper-tiny.en"))   # doctest: +SKIP
    >>> t.transcribe_files(["a.flac"])[0].text                                 # doctest: +SKIP
    'Printing, in the only sense with which we are at present concerned, ...'
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from fxquant.memory import trim_heap

from .decoding import (DecodeOptions, DecodeResult, DecodeScratch, ModelParts, batched, compression_ratio,
                       decode_windows, kernel_thread_policy, loop_start)

__all__ = ["TranscribeOptions", "Transcript", "Transcriber", "split_windows"]


@dataclasses.dataclass(frozen=True)
class TranscribeOptions:
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float = 2.4
    logprob_threshold: float = -1.0
    no_speech_threshold: float = 0.6
    batch_size: int = 8                  # windows decoded together
    encoder_batch: int = 1               # windows per encoder call: its activations are most of the peak memory
    best_of: int = 5
    language: str | None = "en"
    max_tokens: int | None = None


@dataclasses.dataclass
class Transcript:
    text: str
    windows: list[DecodeResult]

    @property
    def temperatures(self) -> list[float]:
        return [w.temperature for w in self.windows]


def split_windows(audio: torch.Tensor) -> torch.Tensor:
    """Log-mel windows (W, n_mels, 3000) of a 16 kHz mono waveform: one per started 30 s.

    The features are openai-whisper's: the mel of the audio followed by 30 s of silence, every window,
    the last one included, a full 3000 frames. The STFT runs only over the frames whose window reaches the
    audio (a frame of zeros has power exactly 0, and frames are computed independently, so the later ones
    are zero columns); the mel projection, log and floor run on all frames, as the full computation does:
    bit for bit the same features, at 40 % of the time for a typical 7 s clip.

    Example:
        >>> split_windows(torch.zeros(16000 * 31)).shape       # 31 s: two windows
        torch.Size([2, 80, 3000])
    """
    from fxquant.models.whisper_frontend import HOP_LENGTH, N_FRAMES, log_mel_from_power, power_spectrogram

    if audio.dim() != 1:
        raise ValueError(f"expected a mono waveform (samples,), got shape {tuple(audio.shape)}")
    content = max(1, -(-audio.shape[0] // HOP_LENGTH))
    n_windows = -(-content // N_FRAMES)
    # frames of the windows + 3: their STFT windows and the end's reflect padding (N_FFT // 2 samples) read
    # zeros only, as after 30 s of silence. Frame f covers samples [f * hop - N_FFT / 2, f * hop + N_FFT / 2):
    # from content + 2 on it sees zeros only; the power spectrum is computed up to content + 8 (so that the
    # end's reflect padding reads zeros there too) and extended with zero columns.
    frames = n_windows * N_FRAMES + 3
    computed = min(frames, content + 8)
    power = power_spectrogram(audio, padding=computed * HOP_LENGTH - audio.shape[0])
    if computed < frames:
        power = torch.cat([power, power.new_zeros(power.shape[0], frames - computed)], dim=1)
    mel = log_mel_from_power(power)
    return mel[:, :n_windows * N_FRAMES].reshape(mel.shape[0], n_windows, N_FRAMES).transpose(0, 1).contiguous()


class Transcriber:
    """Whisper transcription around three callables (fp32 modules or compiled ones) and a tokenizer."""

    def __init__(self, parts: ModelParts, tokenizer, options: TranscribeOptions = TranscribeOptions(),
                 n_mels: int = 80):
        self.parts = parts
        self.tokenizer = tokenizer
        self.options = options
        self.n_mels = n_mels

    @classmethod
    def from_checkpoint(cls, ckpt, options: TranscribeOptions = TranscribeOptions()) -> "Transcriber":
        """fp32 transcription of a WhisperCheckpoint (fxquant.models.whisper_ckpt)."""
        from fxquant.models.whisper_text import WhisperTokenizer

        tok = WhisperTokenizer.from_file(ckpt.directory / "tokenizer.json")
        return cls(ModelParts.from_model(ckpt.model), tok, options, ckpt.model.dims.n_mels)

    # -- public API --------------------------------------------------------------------------------
    def transcribe_files(self, paths: Sequence, progress: Callable[[int], None] | None = None) -> list[Transcript]:
        """Transcripts of audio files (any format soundfile reads, any rate, mono or stereo)."""
        from fxquant.audio import load_audio

        return self.transcribe_audio([load_audio(p) for p in paths], progress)

    @torch.no_grad()
    def transcribe_audio(self, waves: Sequence[torch.Tensor],
                         progress: Callable[[int], None] | None = None) -> list[Transcript]:
        """Transcripts of 16 kHz mono waveforms; `progress(n)` is called as files finish."""
        windows = []                      # (file index, mel window)
        from fxquant.codegen.threadpool import pool_owns_threads

        with pool_owns_threads():         # torch on one thread: for small FFTs a second one costs more than it gives
            for i, wave in enumerate(waves):
                windows.extend((i, w) for w in split_windows(wave))
        results: list[DecodeResult] = []
        last_window = {i: n for n, (i, _) in enumerate(windows)}      # file -> index of its last window
        scratch = DecodeScratch()         # the caches' memory, reused by every batch
        with kernel_thread_policy(self.parts):
            for chunk in batched(windows, self.options.batch_size):
                results.extend(self.decode(torch.stack([w for _, w in chunk]), scratch))
                if progress is not None:
                    progress(sum(last < len(results) for last in last_window.values()))
        scratch.clear()
        trim_heap()                       # the activations' and caches' freed memory back to the OS, once
        per_file: list[list[DecodeResult]] = [[] for _ in waves]
        for (i, _), r in zip(windows, results):
            per_file[i].append(r)
        return [Transcript(" ".join(r.text.strip() for r in rs if r.text.strip()), rs) for rs in per_file]

    def decode(self, mels: torch.Tensor, scratch: DecodeScratch | None = None) -> list[DecodeResult]:
        """Decode a batch of windows with the temperature fallback and the no-speech rule."""
        o = self.options
        # no trim_heap() between batches: memory given back is faulted in again, page by page, by the next
        # batch (tiny.en, 40 LJ Speech files: 160k page faults, 0.15 s); transcribe_audio trims once at the end
        audio = torch.cat([self.parts.encoder(m) for m in mels.split(max(1, o.encoder_batch))])
        final: list[DecodeResult | None] = [None] * mels.shape[0]
        attempts: list[list[DecodeResult]] = [[] for _ in range(mels.shape[0])]
        todo = list(range(mels.shape[0]))
        for t in o.temperatures:
            opts = DecodeOptions(temperature=t, best_of=o.best_of, language=o.language, max_tokens=o.max_tokens)
            got = decode_windows(self.parts, self.tokenizer, mels[todo], opts, audio=audio[todo], scratch=scratch)
            retry = []
            for idx, r in zip(todo, got):
                final[idx] = r
                attempts[idx].append(r)
                if self._silent(r):
                    r.text, r.tokens = "", []
                elif self._needs_fallback(r):
                    if t == o.temperatures[-1]:
                        final[idx] = self._last_resort(attempts[idx])
                    else:
                        retry.append(idx)
            todo = retry
            if not todo:
                break
        return final  # type: ignore[return-value]

    def _last_resort(self, attempts: list[DecodeResult]) -> DecodeResult:
        """Every temperature failed: of the attempts that pass the compression-ratio rule (all, if none does),
        the one with the best average log-probability, its trailing repetition loop cut after the first copy
        (`decoding.loop_start`).
        openai-whisper keeps the last attempt as it is; measured on tiny.en avg 3 bits with a centered token
        table, 5 of 186 LJ Speech clips ended in loops ("a a a a ...") worth 819 word errors."""
        best = min(attempts, key=lambda r: (compression_ratio(r.text) > self.options.compression_ratio_threshold,
                                            -r.avg_logprob))
        cut = loop_start(best.tokens)
        if cut is None:
            return best
        tokens = best.tokens[:cut]
        return dataclasses.replace(best, tokens=tokens, text=self.tokenizer.decode(tokens))

    def _needs_fallback(self, r: DecodeResult) -> bool:
        o = self.options
        return compression_ratio(r.text) > o.compression_ratio_threshold or r.avg_logprob < o.logprob_threshold

    def _silent(self, r: DecodeResult) -> bool:
        o = self.options
        return r.no_speech_prob > o.no_speech_threshold and r.avg_logprob < o.logprob_threshold
