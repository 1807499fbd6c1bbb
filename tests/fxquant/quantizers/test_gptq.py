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


def _skewed(n=2048, k=128, seed=0):
    """Correlated inputs whose channel energies differ 15x (as in transformer layer inputs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.3 + torch.eye(k)
    x = (torch.randn(n, k, generator=g) @ mix) * torch.linspace(0.2, 3.0, k)
    return x, torch.randn(64, k, generator=g)


def _grid_out_err(x, w, codes, grids, gs):
    wq = torch.cat([gr.values().gather(1, codes[:, i * gs:(i + 1) * gs]) for i, gr in enumerate(grids)], 1)
    return (x @ (w - wq).T).pow(2).sum().item()


@pytest.mark.parametrize("gs", [128, 32])
def test_act_order_and_codebook_refit_lower_the_output_error(gs):
    x, w = _skewed()
    h = x.T @ x / x.shape[0]
    err = {}
    for name, kw in (("plain", {}), ("act", {"act_order": True}), ("refit", {"refit": True}),
                     ("both", {"act_order": True, "refit": True})):
        codes, grids = gptq.gptq_round(w, h, lambda blk: codebook.fit(blk, 3), gs, **kw)
        assert len(grids) == 128 // gs and int(codes.max()) <= 7
        err[name] = _grid_out_err(x, w, codes, grids, gs)
    assert err["act"] < 0.7 * err["plain"], err
    assert err["refit"] < 0.9 * err["plain"], err
    assert err["both"] < 0.95 * err["act"], err
    u = {ao: _grid_out_err(x, w, *gptq.gptq_round(w, h, lambda blk: uniform.fit(blk, 3), gs, act_order=ao), gs)
         for ao in (False, True)}
    assert u[True] < 0.7 * u[False], u


def test_refit_keeps_levels_sorted_and_codes_consistent():
    x, w = _skewed(k=64)
    h = x.T @ x / x.shape[0]
    codes, grids = gptq.gptq_round(w, h, lambda blk: codebook.fit(blk, 2), 64, refit=True)
    lv = grids[0].levels
    assert torch.all(lv[:, 1:] >= lv[:, :-1]) and lv.dtype == torch.int8
    new = gptq.refit_levels(w, h.double(), codes.clone(), grids, 64)    # a fixed point: refitting again changes little
    assert _grid_out_err(x, w, codes, new, 64) <= 1.01 * _grid_out_err(x, w, codes, grids, 64)
