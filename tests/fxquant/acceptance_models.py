"""Speech-model architectures used by the capture/pipeline acceptance tests (random weights)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConformerBlock(nn.Module):
    """Macaron FFN / MHSA / conv module / FFN, as in Conformer (Gulati et al. 2020)."""

    def __init__(self, d: int = 64, heads: int = 4, kernel: int = 15):
        super().__init__()
        self.ff1 = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Dropout(0.1), nn.Linear(4 * d, d)
        )
        self.attn_ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.conv_ln = nn.LayerNorm(d)
        self.pw1 = nn.Conv1d(d, 2 * d, 1)
        self.dw = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.bn = nn.BatchNorm1d(d)
        self.pw2 = nn.Conv1d(d, d, 1)
        self.ff2 = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Dropout(0.1), nn.Linear(4 * d, d)
        )
        self.out_ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        h = self.attn_ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        c = self.conv_ln(x).transpose(1, 2)
        c = F.glu(self.pw1(c), dim=1)
        c = self.pw2(F.silu(self.bn(self.dw(c))))
        x = x + c.transpose(1, 2)
        return self.out_ln(x + 0.5 * self.ff2(x))


class LSTMRecognizer(nn.Module):
    """Conv front end + 2-layer LSTM + CTC projection."""

    def __init__(self, n_mels: int = 40, hidden: int = 96, vocab: int = 11):
        super().__init__()
        self.front = nn.Conv1d(n_mels, hidden, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm1d(hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True)
        self.proj = nn.Linear(hidden, vocab)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.front(feats))).transpose(1, 2)
        return self.proj(self.lstm(h)[0]).log_softmax(-1)


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so folding is actually tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()
