"""Connected-digit CTC recognizer: a small QuartzNet-style 1-D conv net over log-mel features.

Vocabulary: blank + "zero".."nine". Input features (B, n_mels, T) from `features()` (64 log-mels,
25 ms window, 10 ms hop, per-utterance mean/variance normalised); output log-probs (B, ceil(T/2), 11).
Trained by scripts/train_digits.py; the checkpoint is fxquant/models/weights/digits.pt.

Example:
    >>> model = load_digits_model()                         # doctest: +SKIP
    >>> transcribe(model, wave16k)                          # doctest: +SKIP
    ['four', 'two']
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fxquant.audio import LogMel
from fxquant.datasets import DIGIT_WORDS

__all__ = ["VOCAB", "BLANK", "DigitsConfig", "DigitsCTC", "features", "batch_features", "ctc_greedy",
           "transcribe", "transcribe_batch", "load_digits_model", "save_digits_model", "DEFAULT_CHECKPOINT"]

VOCAB = ["<blank>"] + DIGIT_WORDS
BLANK = 0
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "digits.pt"


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
    """Model and front-end settings (stored in the checkpoint as a plain dict)."""
    n_mels: int = 64
    n_fft: int = 512
    win_length: int = 400          # 25 ms at 16 kHz
    hop_length: int = 160          # 10 ms
    channels: int = 160
    stem_kernel: int = 11
    kernels: tuple = (13, 15, 17, 19, 21)
    repeats: int = 2
    head_channels: int = 256
    dropout: float = 0.1


class SepConvBN(nn.Module):
    """Depthwise conv1d (k, 'same') -> pointwise conv1d -> BatchNorm1d."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.depthwise = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)
        self.pointwise = nn.Conv1d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pointwise(self.depthwise(x)))


class Block(nn.Module):
    """`repeats` separable convs with ReLU in between, plus a 1x1-conv+BN residual, then ReLU + dropout."""

    def __init__(self, channels: int, kernel: int, repeats: int, dropout: float):
        super().__init__()
        self.convs = nn.ModuleList(SepConvBN(channels, kernel) for _ in range(repeats))
        self.residual = nn.Sequential(nn.Conv1d(channels, channels, 1, bias=False), nn.BatchNorm1d(channels))
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for i, conv in enumerate(self.convs):
            y = conv(y)
            if i < len(self.convs) - 1:
                y = self.drop(self.act(y))
        return self.drop(self.act(y + self.residual(x)))


class DigitsCTC(nn.Module):
    """(B, n_mels, T) normalised log-mels -> (B, ceil(T/2), len(VOCAB)) CTC log-probabilities.

    Example:
        >>> DigitsCTC()(torch.zeros(1, 64, 101)).shape
        torch.Size([1, 51, 11])
    """

    def __init__(self, config: DigitsConfig | None = None):
        super().__init__()
        c = config or DigitsConfig()
        self.config = c
        self.stem = nn.Sequential(
            nn.Conv1d(c.n_mels, c.channels, c.stem_kernel, stride=2, padding=c.stem_kernel // 2, bias=False),
            nn.BatchNorm1d(c.channels), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(c.channels, k, c.repeats, c.dropout) for k in c.kernels])
        self.head = nn.Sequential(
            nn.Conv1d(c.channels, c.head_channels, 1, bias=False), nn.BatchNorm1d(c.head_channels), nn.ReLU(),
            nn.Conv1d(c.head_channels, len(VOCAB), 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(feats)))
        return torch.log_softmax(x.transpose(1, 2), dim=-1)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames out for `lengths` frames in (stride-2 stem)."""
        return (lengths + 1) // 2


_FRONTENDS: dict = {}


def features(wave16k: torch.Tensor, config: DigitsConfig | None = None) -> torch.Tensor:
    """(samples,) 16 kHz wave -> (n_mels, T) ln-mel features, normalised per mel band over time.

    Example:
        >>> features(torch.randn(16000)).shape
        torch.Size([64, 101])
    """
    c = config or DigitsConfig()
    key = (c.n_mels, c.n_fft, c.win_length, c.hop_length)
    if key not in _FRONTENDS:
        _FRONTENDS[key] = LogMel(16000, c.n_fft, c.win_length, c.hop_length, c.n_mels, f_max=8000.0,
                                 log="ln", eps=1e-6, channel_dim=False)
    if wave16k.dim() != 1:
        raise ValueError(f"expected a 1-D 16 kHz waveform, got shape {tuple(wave16k.shape)}")
    if wave16k.numel() < c.n_fft:
        wave16k = torch.nn.functional.pad(wave16k, (0, c.n_fft - wave16k.numel()))
    f = _FRONTENDS[key](wave16k)[0]
    return (f - f.mean(dim=1, keepdim=True)) / (f.std(dim=1, keepdim=True) + 1e-5)


def batch_features(waves: Sequence[torch.Tensor], config: DigitsConfig | None = None):
    """Zero-padded batch (B, n_mels, T_max) and the (B,) true frame counts."""
    feats = [features(w, config) for w in waves]
    lengths = torch.tensor([f.shape[1] for f in feats])
    batch = torch.zeros(len(feats), feats[0].shape[0], int(lengths.max()))
    for i, f in enumerate(feats):
        batch[i, :, :f.shape[1]] = f
    return batch, lengths


def ctc_greedy(log_probs: torch.Tensor, length: int | None = None) -> list[str]:
    """Best-path CTC decoding of (T, V) scores: argmax, merge repeats, drop blanks -> words."""
    ids = log_probs[:length].argmax(dim=-1).tolist()
    out, prev = [], BLANK
    for i in ids:
        if i != prev and i != BLANK:
            out.append(VOCAB[i])
        prev = i
    return out


@torch.no_grad()
def transcribe(model, wave16k: torch.Tensor, config: DigitsConfig | None = None) -> list[str]:
    """Recognise one 16 kHz utterance; `model` is any callable (B, n_mels, T) -> (B, T', V).

    Example:
        >>> transcribe(load_digits_model(), wave16k)      # doctest: +SKIP
        ['three', 'one']
    """
    config = config or getattr(model, "config", None)
    return ctc_greedy(model(features(wave16k, config)[None])[0])


@torch.no_grad()
def transcribe_batch(model, waves: Sequence[torch.Tensor], config: DigitsConfig | None = None,
                     batch_size: int = 32) -> list[list[str]]:
    """Recognise many utterances in padded batches (same results as `transcribe` up to padding effects)."""
    config = config or getattr(model, "config", None)
    out = []
    for i in range(0, len(waves), batch_size):
        feats, lengths = batch_features(waves[i:i + batch_size], config)
        log_probs = model(feats)
        out.extend(ctc_greedy(lp, int((n + 1) // 2)) for lp, n in zip(log_probs, lengths))
    return out


def save_digits_model(model: DigitsCTC, path, meta: dict | None = None) -> None:
    """Write {"config", "state_dict", "meta"} (fp32) loadable with weights_only=True."""
    cfg = dataclasses.asdict(model.config)
    cfg["kernels"] = list(cfg["kernels"])
    state = {k: v.detach().float().clone() if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg, "state_dict": state, "meta": dict(meta or {})}, path)


def load_digits_model(path=None) -> DigitsCTC:
    """Load the trained recognizer (default: the committed fxquant/models/weights/digits.pt), eval mode.

    Example:
        >>> model = load_digits_model()         # doctest: +SKIP
    """
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"digit model checkpoint not found: {path}; train it with scripts/train_digits.py")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: expected a dict with 'config' and 'state_dict' (written by save_digits_model)")
    cfg = dict(ckpt["config"])
    cfg["kernels"] = tuple(cfg["kernels"])
    model = DigitsCTC(DigitsConfig(**cfg))
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.meta = ckpt.get("meta", {})
    return model.eval()
