"""fold-bn on conv1d/conv2d/linear incl. grouped and depthwise; unfoldable patterns keep a reason."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fxquant import ir

from ..fxquant.acceptance_models import randomize_batchnorm
from .helpers import run, targets

aten = torch.ops.aten
BN = aten.batch_norm.default


@pytest.mark.parametrize(
    "model,shape",
    [
        (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), (2, 3, 9, 9)),
        (
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)),
            (2, 8, 9, 9),
        ),  # depthwise
        (
            nn.Sequential(nn.Conv2d(8, 12, (3, 1), groups=4, bias=False), nn.BatchNorm2d(12)),
            (2, 8, 9, 9),
        ),  # grouped
        (nn.Sequential(nn.Conv1d(16, 32, 5, stride=2), nn.BatchNorm1d(32)), (2, 16, 40)),
        (
            nn.Sequential(nn.Conv1d(16, 16, 5, groups=16, padding=2), nn.BatchNorm1d(16, affine=False)),
            (2, 16, 40),
        ),
        (nn.Sequential(nn.Linear(10, 6), nn.BatchNorm1d(6)), (4, 10)),
    ],
)
def test_folds_and_matches_eager(model, shape):
    model = randomize_batchnorm(model)
    x = torch.randn(shape)
    gm = run(model, (x,), "fold-bn")
    assert BN not in targets(gm)
    conv = next(n for n in gm.graph.nodes if ir.is_quantizable(n))
    assert any(p.startswith("fold-bn: folded batch_norm") for p in conv.meta[ir.PROVENANCE])
    assert conv.args[1].target.endswith("weight_bn_folded")
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)  # fp32 refold: tolerance 1e-5


def test_original_model_weights_untouched():
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    w = model[0].weight.detach().clone()
    run(model, (torch.randn(1, 3, 8, 8),), "fold-bn")
    assert torch.equal(model[0].weight, w) and hasattr(model[1], "running_mean")


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class BnAfterRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class LinearOn3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):  # BN normalises dim 1 (time), not the linear's output features
        return self.bn(self.fc(x))


@pytest.mark.parametrize(
    "model,shape,reason",
    [
        (SharedConv(), (1, 3, 8, 8), "has 2 users, folding would change the others"),
        (BnAfterRelu(), (1, 3, 8, 8), "its input is relu.default, not a conv1d/conv2d/linear"),
        (LinearOn3d(), (2, 5, 6), "linear output is not 2-D"),
    ],
)
def test_unfoldable_patterns_keep_the_bn_and_say_why(model, shape, reason):
    model = randomize_batchnorm(model)
    x = torch.randn(shape)
    gm = run(model, (x,), "fold-bn")
    bn = next(n for n in gm.graph.nodes if n.target is BN)
    assert any(reason in p for p in bn.meta[ir.PROVENANCE]), bn.meta[ir.PROVENANCE]
    torch.testing.assert_close(gm(x), model(x))
