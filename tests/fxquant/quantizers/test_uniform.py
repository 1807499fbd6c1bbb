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
