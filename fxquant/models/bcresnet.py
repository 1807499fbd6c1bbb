"""BC-ResNet keyword spotter (Kim et al. 2021, width scale 2, 35 Speech Commands words).

Written from `shared/models/bcresnet/ARCHITECTURE.md`; the pretrained `model-sc-2.pt` loads with
strict=True. Input: log2-mel features (B, 1, 40, T) from `fxquant.audio.LogMel()`; output: log-probs (B, 35).

Example:
    >>> model = load_bcresnet()                                   # doctest: +SKIP
    >>> feats, digits = fsdd_features("test")                     # doctest: +SKIP
    >>> LABELS[model(feats[:1]).argmax(1).item()]                  # doctest: +SKIP
    'zero'
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fxquant import audio, datasets

__all__ = ["LABELS", "BCResNet", "SubSpectralNorm", "load_bcresnet", "default_weights_path",
           "fsdd_features", "keyword_accuracy", "DIGIT_LABEL_INDEX"]

LABELS = ("backward bed bird cat dog down eight five follow forward four go happy house learn left marvin "
          "nine no off on one right seven sheila six stop three tree two up visual wow yes zero").split()
DIGIT_LABEL_INDEX = [LABELS.index(w) for w in datasets.DIGIT_WORDS]   # digit d -> class index


class SubSpectralNorm(nn.Module):
    """BatchNorm applied separately to `n_bands` frequency sub-bands: (N,C,F,T) -> (N,C*S,F/S,T) -> BN -> back."""

    def __init__(self, channels: int, n_bands: int = 5):
        super().__init__()
        self.n_bands = n_bands
        self.bn = nn.BatchNorm2d(channels * n_bands)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, f, t = x.shape
        y = self.bn(x.reshape(n, c * self.n_bands, f // self.n_bands, t))
        return y.reshape(n, c, f, t)


def _temporal_branch(channels: int, dilation: int, dropout: float) -> nn.Sequential:
    """f1: depthwise (1,3) dilated conv, BN, SiLU, 1x1 conv, Dropout2d (indices 0..4)."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, (1, 3), padding=(0, dilation), dilation=(1, dilation), groups=channels),
        nn.BatchNorm2d(channels),
        nn.SiLU(),
        nn.Conv2d(channels, channels, 1),
        nn.Dropout2d(dropout),
    )


class TransitionBlock(nn.Module):
    """Changes channels (and optionally halves frequency); output = ReLU(y + f1(mean_F(y)))."""

    def __init__(self, c_in: int, c_out: int, dilation: int = 1, stride: int = 1, dropout: float = 0.1):
        super().__init__()
        self.f2 = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, (3, 1), stride=(stride, 1), padding=(1, 0), groups=c_out),
            SubSpectralNorm(c_out, 5),
        )
        self.f1 = _temporal_branch(c_out, dilation, dropout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.f2(x)
        z = self.f1(y.mean(dim=2, keepdim=True))
        return self.act(y + z)                      # z broadcasts along frequency


class NormalBlock(nn.Module):
    """Keeps the shape; output = ReLU(x + y + f1(mean_F(y))) with y = SSN(dwconv(x))."""

    def __init__(self, channels: int, dilation: int = 1, dropout: float = 0.1):
        super().__init__()
        self.f2 = nn.Sequential(
            nn.Conv2d(channels, channels, (3, 1), padding=(1, 0), groups=channels),
            SubSpectralNorm(channels, 5),
        )
        self.f1 = _temporal_branch(channels, dilation, dropout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.f2(x)
        z = self.f1(y.mean(dim=2, keepdim=True))
        return self.act(x + y + z)


class BCResNet(nn.Module):
    """BC-ResNet-2: (B, 1, 40, T) log-mel -> (B, n_classes) log-probabilities.

    Example:
        >>> BCResNet()(torch.zeros(2, 1, 40, 32)).shape
        torch.Size([2, 35])
    """

    def __init__(self, n_classes: int = 35, dropout: float = 0.1):
        super().__init__()
        self.input_conv = nn.Conv2d(1, 32, 5, stride=(2, 1), padding=2)
        self.t1 = TransitionBlock(32, 16, dilation=1, stride=1, dropout=dropout)
        self.n11 = NormalBlock(16, dilation=1, dropout=dropout)
        self.t2 = TransitionBlock(16, 24, dilation=2, stride=2, dropout=dropout)
        self.n21 = NormalBlock(24, dilation=2, dropout=dropout)
        self.t3 = TransitionBlock(24, 32, dilation=4, stride=2, dropout=dropout)
        self.n31 = NormalBlock(32, dilation=4, dropout=dropout)
        self.n32 = NormalBlock(32, dilation=4, dropout=dropout)
        self.n33 = NormalBlock(32, dilation=4, dropout=dropout)
        self.t4 = TransitionBlock(32, 40, dilation=8, stride=1, dropout=dropout)
        self.n41 = NormalBlock(40, dilation=8, dropout=dropout)
        self.n42 = NormalBlock(40, dilation=8, dropout=dropout)
        self.n43 = NormalBlock(40, dilation=8, dropout=dropout)
        self.dw_conv = nn.Conv2d(40, 40, 5, groups=20)
        self.onexone_conv = nn.Conv2d(40, 64, 1)
        self.head_conv = nn.Conv2d(64, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_conv(x)
        for block in (self.t1, self.n11, self.t2, self.n21, self.t3, self.n31, self.n32, self.n33,
                      self.t4, self.n41, self.n42, self.n43):
            x = block(x)
        x = self.onexone_conv(self.dw_conv(x))
        x = self.head_conv(x.mean(dim=3, keepdim=True))     # (B, n_classes, 1, 1)
        return torch.log_softmax(x.flatten(1), dim=1)


def default_weights_path() -> Path:
    """<shared>/models/bcresnet/model-sc-2.pt; FileNotFoundError when the shared dir is absent."""
    shared = datasets.shared_dir()
    if shared is None:
        raise FileNotFoundError("shared dir not found (expected ../shared next to the repo); set FXQUANT_SHARED")
    return shared / "models" / "bcresnet" / "model-sc-2.pt"


def load_bcresnet(path=None) -> BCResNet:
    """Build BC-ResNet-2, load the pretrained weights (strict), return it in eval mode.

    Example:
        >>> model = load_bcresnet()            # doctest: +SKIP
    """
    path = Path(path) if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"BC-ResNet weights not found at {path}; pass path= or set FXQUANT_SHARED")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = BCResNet()
    model.load_state_dict(state, strict=True)
    return model.eval()


_FEATURE_CACHE: dict = {}
PAD_MODES = ("crop", "full", "none")


def fsdd_features(split: str = "all", root=None, pad: str = "crop", cache_path=None):
    """Features of FSDD clips for BC-ResNet: (features, (N,) digit labels), cached in-process.

    Each clip is resampled 8k -> 16 kHz, then per `pad`:
    - "crop" (default): zero-padded, centred, to 1 s; the 20 clips longer than 1 s are centre-cropped,
      so all clips batch together: features (N, 1, 40, 32).
    - "full": as "crop" but long clips keep their full length: a list of (1, 1, 40, T) tensors.
    - "none": no padding: a list of (1, 1, 40, T) tensors.
    `split`: "all" (3000 clips), "test" (takes 0-4, 300) or "train" (takes 5-49, 2700).
    `cache_path`: optional file to reuse across processes (written on first use, ~15 MB for "all").

    Example:
        >>> feats, digits = fsdd_features("test")     # doctest: +SKIP
        >>> feats.shape                                  # doctest: +SKIP
        torch.Size([300, 1, 40, 32])
    """
    if pad not in PAD_MODES:
        raise ValueError(f"pad must be one of {PAD_MODES}, got {pad!r}")
    key = (split, str(root), pad)
    tag = f"bcresnet-fsdd-v1:{split}:{pad}"
    if key not in _FEATURE_CACHE and cache_path is not None and Path(cache_path).is_file():
        saved = torch.load(cache_path, map_location="cpu", weights_only=True)
        if saved.get("tag") != tag:
            raise ValueError(f"{cache_path} holds features {saved.get('tag')!r}, not {tag!r}; delete it or pass another path")
        _FEATURE_CACHE[key] = (saved["feats"], saved["digits"])
    if key not in _FEATURE_CACHE:
        clips = datasets.fsdd_clips(split, root=root)
        waves = [datasets.load_clip16k(c.path) for c in clips]
        front = audio.LogMel()
        if pad == "crop":
            feats = front(torch.stack([_centre_to(w, 16000) for w in waves]))
        elif pad == "full":
            feats = [front(_centre_to(w, 16000) if w.numel() < 16000 else w) for w in waves]
        else:
            feats = [front(w) for w in waves]
        _FEATURE_CACHE[key] = (feats, torch.tensor([c.digit for c in clips]))
        if cache_path is not None:
            torch.save({"tag": tag, "feats": feats, "digits": _FEATURE_CACHE[key][1]}, cache_path)
    return _FEATURE_CACHE[key]


def _centre_to(x: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad (or crop) a 1-D signal to n samples, keeping it centred."""
    if x.numel() >= n:
        start = (x.numel() - n) // 2
        return x[start:start + n]
    left = (n - x.numel()) // 2
    return torch.nn.functional.pad(x, (left, n - x.numel() - left))


@torch.no_grad()
def keyword_accuracy(model=None, split: str = "all", root=None, pad: str = "crop",
                     batch_size: int = 500) -> tuple[int, int]:
    """Count FSDD clips whose argmax over all 35 classes is the digit's word: (correct, total).

    `model` may be any callable mapping (B, 1, 40, T) -> (B, 35) scores (e.g. a compiled model);
    default: the pretrained fp32 model. Measured fp32 on all 3000 clips: pad="crop" 2721,
    pad="full" 2724 (the published 90.8 %), pad="none" 2631.

    Example:
        >>> correct, total = keyword_accuracy(load_bcresnet(), "test")   # doctest: +SKIP
    """
    model = load_bcresnet() if model is None else model
    feats, digits = fsdd_features(split, root=root, pad=pad)
    target = torch.tensor(DIGIT_LABEL_INDEX)[digits]
    if pad == "crop":
        preds = torch.cat([model(feats[i:i + batch_size]).argmax(1) for i in range(0, len(feats), batch_size)])
    else:
        preds = torch.cat([model(f).argmax(1) for f in feats])
    return int((preds == target).sum()), len(target)
