"""Uniform grids: level layout, symmetric/asymmetric fit, clip search."""
import pytest
import torch

from fxquant.quantizers import grid_round, uniform


pytestmark = pytest.mark.usefixtures("one_thread")


def test_symmetric_levels_and_scale():
    g = uniform.fit(torch.tensor([[-1.0, 0.5, 1.0]]), bits=2, symmetric=True, clip_search=False)
    assert g.levels.tolist() == [[-2, -1, 0, 1]]
    assert g.scale.tolist() == [1.0]
    assert uniform.tables(4, True).tolist() == [list(range(-8, 8))]


def test_asymmetric_zero_point_table_row():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = uniform.fit(w, bits=2, symmetric=False, clip_search=False)
    assert g.table_id.tolist() == [0]                       # min is 0 -> zero point 0
    _, q = grid_round(w, g)
    assert torch.allclose(q, w)
    tables = uniform.tables(2, False)
    assert tables[g.table_id[0]].tolist() == g.levels[0].tolist()


def test_clip_search_beats_minmax_on_heavy_tails():
    w = torch.distributions.StudentT(2.0).sample((64, 256))
    err = {}
    for clip in (False, True):
        _, q = grid_round(w, uniform.fit(w, 3, True, clip_search=clip))
        err[clip] = (q - w).pow(2).sum().item()
    assert err[True] < 0.8 * err[False]


def _reference_fit(w, bits, symmetric, weight, ratios):
    """The definition, row by row of work: grid per ratio, nearest value by searchsorted, first best ratio wins."""
    n_levels = 1 << bits
    wt = torch.ones_like(w) if weight is None else weight.expand_as(w)
    best = None
    for ratio in ratios:
        if symmetric:
            scale = w.abs().amax(-1) * ratio / (n_levels // 2 - 1)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            levels = (torch.arange(n_levels) - n_levels // 2).float().expand(w.shape[0], -1)
        else:
            lo, hi = w.amin(-1).clamp(max=0) * ratio, w.amax(-1).clamp(min=0) * ratio
            scale = (hi - lo) / (n_levels - 1)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.round(-lo / scale).clamp(0, n_levels - 1)
            levels = torch.arange(n_levels)[None].float() - zero[:, None]
        vals = scale[:, None] * levels
        mid = ((vals[:, 1:] + vals[:, :-1]) * 0.5).contiguous()
        codes = torch.searchsorted(mid, w.contiguous())
        err = ((vals.gather(1, codes) - w) ** 2 * wt).sum(-1)
        if best is None:
            best = [scale, codes, err]
            continue
        better = err < best[2]
        best = [torch.where(better, scale, best[0]), torch.where(better[:, None], codes, best[1]),
                torch.where(better, err, best[2])]
    return best[0], best[1]


@pytest.mark.parametrize("bits,symmetric", [(2, True), (3, True), (4, True), (8, True), (2, False), (3, False),
                                            (4, False)])
def test_vectorised_fit_equals_the_row_by_row_definition(bits, symmetric):
    cases = [torch.randn(48, 64), torch.distributions.StudentT(2.0).sample((48, 64)),
             torch.randint(-8, 8, (48, 64)).float() * 0.5]                      # exact ties on the midpoints
    for w in cases:
        weight = torch.rand(64) + 0.1
        for clip in (True, False):
            ratios = uniform.CLIP_RATIOS if clip else (1.0,)
            scale, codes = _reference_fit(w, bits, symmetric, weight, ratios)
            g = uniform.fit(w, bits, symmetric, weight, clip_search=clip)
            assert torch.equal(g.scale, scale)
            assert torch.equal(grid_round(w, g)[0], codes)


def test_quantize_groups_equals_fit_per_group():
    w, weight = torch.randn(32, 4, 24), torch.rand(1, 4, 24)
    codes, grid = uniform.quantize_groups(w, 3, symmetric=False, weight=weight)
    for gi in range(4):
        g = uniform.fit(w[:, gi], 3, False, weight[0, gi])
        assert torch.equal(grid.scale.view(32, 4)[:, gi], g.scale)
        assert torch.equal(grid.table_id.view(32, 4)[:, gi], g.table_id)
        assert torch.equal(codes[:, gi].long(), grid_round(w[:, gi], g)[0])
