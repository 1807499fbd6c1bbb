"""Centering a tied token table before quantizing it (fxquant.quantizers.equalize)."""
import pytest
import torch

from fxquant.quantizers import codebook, grid_round
from fxquant.quantizers.equalize import center_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _table(v=3000, d=64, seed=0):
    """A token table shaped like Whisper tiny.en's: small rows around a large shared mean row."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g) * 0.02
    mu[7] = 0.3                                          # one outlier column in the mean (tiny.en: column 192)
    return torch.randn(v, d, generator=g) * 0.01 + mu, torch.randn(200, d, generator=g)


def _cb3(w):
    return grid_round(w, codebook.fit(w, 3))[1]


def test_center_rows_is_exact_and_centered():
    w, _ = _table()
    wc, mu = center_rows(w)
    assert torch.allclose(wc + mu, w, atol=1e-7)
    assert wc.mean(0).abs().max().item() < 1e-7
    with pytest.raises(ValueError):
        center_rows(torch.zeros(3))


def test_centering_lowers_the_error_of_both_uses_of_a_tied_table():
    w, h = _table()
    wc, mu = center_rows(w)
    raw, centered = _cb3(w), _cb3(wc) + mu              # the mean is kept exactly (positional embedding)
    emb_err = {k: (q - w).pow(2).sum().item() for k, q in (("raw", raw), ("centered", centered))}

    def logit_err(q):                                    # softmax ignores one constant per position
        d = h @ (q - w).T
        return (d - d.mean(1, keepdim=True)).pow(2).sum().item()

    log_err = {"raw": logit_err(raw), "centered": logit_err(centered)}
    assert emb_err["centered"] < 0.25 * emb_err["raw"], emb_err
    assert log_err["centered"] < 0.25 * log_err["raw"], log_err
