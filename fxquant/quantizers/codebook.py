"""Non-uniform b-bit codebooks learned by weighted k-means, stored as int8 tables + a float scale.

Each row (one output channel, or one (channel, group) block) gets 2^b centroids minimising
sum_k weight[k] * (w[k] - c[code[k]])^2; the weight is the input-channel energy diag(H) from
calibration, so channels that carry more signal are fitted more closely. Initialisation is
deterministic (blends of quantiles and an even grid, best per row), then `iters` Lloyd steps vectorised over rows (1-D
assignment by `searchsorted` on sorted centroids). Centroids c become int8 levels with
s = max|c| / 127 and level = round(c / s): 2^b centroids represented to int8 precision.

Example:
    >>> import torch
    >>> g = fit(torch.tensor([[0.0, 0.1, 1.0, 1.1]]), bits=2)
    >>> [round(v, 2) for v in g.values()[0].tolist()]
    [0.0, 0.1, 1.0, 1.1]
"""
from __future__ import annotations

import torch

from . import Grid


INIT_MIXES = (1.0, 0.65, 0.5, 0.35)


def _lloyd(x: torch.Tensor, wt: torch.Tensor, c: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd steps from sorted centroids c [R, k]; returns (centroids, weighted error [R])."""
    r, k = c.shape
    for _ in range(iters + 1):
        mid = ((c[:, 1:] + c[:, :-1]) * 0.5).contiguous()
        a = torch.searchsorted(mid, x)
        if _ == iters:
            break
        num = torch.zeros(r, k).scatter_add_(1, a, wt * x)
        den = torch.zeros(r, k).scatter_add_(1, a, wt)
        c = torch.where(den > 0, num / den.clamp(min=1e-30), c).sort(-1).values.contiguous()
    return c, (wt * (x - c.gather(1, a)) ** 2).sum(-1)


def weighted_kmeans(x: torch.Tensor, weight: torch.Tensor | None, k: int, iters: int = 15) -> torch.Tensor:
    """Sorted centroids [R, k] of the 1-D points of each row of x [R, P] (weights [R, P] or [P]).

    Deterministic: Lloyd runs from a few inits that blend evenly spaced quantiles with an evenly
    spaced grid over [min, max] (INIT_MIXES = quantile share); the best run per row is kept.
    """
    x = x.float().contiguous()
    r, p = x.shape
    wt = torch.ones_like(x) if weight is None else weight.float().expand_as(x).clamp(min=0) + 1e-12
    xs = x.sort(-1).values
    frac = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    quant = xs[:, (frac * p).long().clamp(max=p - 1)]
    lo, hi = xs[:, :1], xs[:, -1:]
    even = lo + (hi - lo) * frac
    best_c, best_e = None, None
    for mix in INIT_MIXES:
        c, e = _lloyd(x, wt, (mix * quant + (1 - mix) * even).contiguous(), iters)
        if best_c is None:
            best_c, best_e = c, e
        else:
            better = e < best_e
            best_c = torch.where(better[:, None], c, best_c)
            best_e = torch.where(better, e, best_e)
    return best_c


def to_int8(centroids: torch.Tensor) -> Grid:
    """Grid with levels = round(c / s), s = max|c| / 127 per row (s = 1 for all-zero rows)."""
    amax = centroids.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    levels = torch.round(centroids / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Grid(scale.float(), levels, torch.full((centroids.shape[0],), -1, dtype=torch.long))


def fit(w: torch.Tensor, bits: int, weight: torch.Tensor | None = None, iters: int = 15) -> Grid:
    """Codebook grid (2^bits int8 levels + scale) for each row of w [R, P]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"codebook bits must be in 2..8, got {bits}")
    return to_int8(weighted_kmeans(w, weight, 1 << bits, iters))
