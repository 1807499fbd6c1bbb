"""Weighted k-means codebooks."""
import pytest
import torch

from fxquant.quantizers import codebook, grid_round


pytestmark = pytest.mark.usefixtures("one_thread")


def test_recovers_exact_clusters_and_int8_levels():
    g = codebook.fit(torch.tensor([[0.0, 0.1, 1.0, 1.1]]), bits=2)
    assert g.levels.tolist() == [[0, 12, 115, 127]]
    assert abs(g.scale.item() - 1.1 / 127) < 1e-7


def test_weights_pull_centroids_towards_important_points():
    x = torch.tensor([[0.0, 1.0, 2.0, 10.0, 11.0]])
    plain = codebook.weighted_kmeans(x, None, 2)
    heavy = codebook.weighted_kmeans(x, torch.tensor([1.0, 1.0, 100.0, 1.0, 1.0]), 2)
    assert plain[0, 0].item() == 1.0
    assert heavy[0, 0].item() > 1.9


def test_deterministic_and_vectorised_over_rows():
    w = torch.randn(32, 128)
    a, b = codebook.fit(w, 3), codebook.fit(w, 3)
    assert torch.equal(a.levels, b.levels) and torch.equal(a.scale, b.scale)
    row = codebook.fit(w[5:6], 3)
    assert torch.equal(row.levels[0], a.levels[5])


def test_beats_uniform_per_channel_on_student_t():
    from fxquant.quantizers import uniform
    w = torch.distributions.StudentT(3.0).sample((64, 384))
    e_cb = (grid_round(w, codebook.fit(w, 4))[1] - w).pow(2).sum()
    e_un = (grid_round(w, uniform.fit(w, 4))[1] - w).pow(2).sum()
    assert 10 * torch.log10(e_un / e_cb) > 2.0          # > 2 dB better
