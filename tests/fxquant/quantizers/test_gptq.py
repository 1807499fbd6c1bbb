"""GPTQ error-compensating rounding."""
import pytest
import torch

from fxquant.formats import quantize_weight
from fxquant.qweight import dequantize
from fxquant.quantizers import codebook, gptq, uniform


pytestmark = pytest.mark.usefixtures("one_thread")


def _correlated(n=1024, k=128):
    mix = torch.randn(k, k) * 0.3 + torch.eye(k)
    return torch.randn(n, k) @ mix


def _out_err(x, w, wq):
    return (x @ (w - wq).T).pow(2).sum().item()


def test_gptq_reduces_output_error_uniform_and_codebook():
    x, w = _correlated(), torch.randn(64, 128)
    h = x.T @ x / x.shape[0]
    for scheme, gran, gs in (("uniform", "group", 32), ("codebook", "channel", None)):
        errs = {r: _out_err(x, w, dequantize(quantize_weight(w, 3, scheme, gran, gs, hessian=h, rounding=r)))
                for r in ("nearest", "gptq")}
        assert errs["gptq"] < 0.75 * errs["nearest"], (scheme, errs)


def test_one_grid_per_group_and_dead_columns():
    w = torch.randn(8, 40)
    h = torch.eye(40)
    h[3, 3] = 0.0                                        # a dead input channel
    codes, grids = gptq.gptq_round(w, h, lambda blk: uniform.fit(blk, 4), group_size=16, block=8)
    assert codes.shape == (8, 40) and len(grids) == 3    # 16 + 16 + 8 (partial last group)
    codes, grids = gptq.gptq_round(w, h, lambda blk: codebook.fit(blk, 2), group_size=40)
    assert len(grids) == 1 and int(codes.max()) <= 3
