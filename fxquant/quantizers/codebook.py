"""Non-uniform b-bit codebooks learned by weighted k-means, stored as int8 tables + a float scale.

Each row (one output channel, or one (channel, group) block) gets 2^b centroids minimising
sum_k weight[k] * (w[k] - c[code[k]])^2; the weight is the input-channel energy diag(H) from
calibration, so channels that carry more signal are fitted more closely. Initialisation is
deterministic (blends of quantiles and an even grid, best per row), then `iters` Lloyd steps vectorised over rows
(and over groups: `quantize_groups`); on sorted points a step costs O(k log P) per row (prefix sums). Centroids c become int8 levels with
s = max|c| / 127 and level = round(c / s): 2^b centroids represented to int8 precision.

Example:
    >>> import torch
    >>> g = fit(torch.tensor([[0.0, 0.1, 1.0, 1.1]]), bits=2)
    >>> [round(v, 2) for v in g.values()[0].tolist()]
    [0.0, 0.1, 1.0, 1.1]
"""
from __future__ import annotations

import torch

from . import Grid, nearest_codes

CHUNK_ELEMENTS = 1 << 16  # weights per k-means chunk: rows are independent, chunks bound memory and stay in cache


INIT_MIXES = (1.0, 0.65, 0.5, 0.35)


def _lloyd(x: torch.Tensor, wt: torch.Tensor, sorted_x: torch.Tensor, sums: tuple[torch.Tensor, torch.Tensor],
           c: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd steps from sorted centroids c [R, k]; returns (centroids, weighted error [R]).

    On sorted points a cluster is a contiguous run, so each step only searches the k-1 midpoints
    in the sorted row and reads the cluster sums off prefix sums (`sums`: float64 [R, P+1] of wt
    and wt*x in sorted order): O(k log P) per row and step instead of O(P). Points on a midpoint
    join the lower cluster, as searchsorted(mid, x) decides.
    """
    r, p = c.shape[0], sorted_x.shape[1]
    cum_w, cum_wx = sums
    first, last = torch.zeros(r, 1, dtype=torch.long), torch.full((r, 1), p, dtype=torch.long)
    for _ in range(iters):
        mid = ((c[:, 1:] + c[:, :-1]) * 0.5).contiguous()
        bounds = torch.cat([first, torch.searchsorted(sorted_x, mid, right=True), last], 1)
        den = cum_w.gather(1, bounds[:, 1:]) - cum_w.gather(1, bounds[:, :-1])
        num = cum_wx.gather(1, bounds[:, 1:]) - cum_wx.gather(1, bounds[:, :-1])
        c = torch.where(den > 0, (num / den.clamp(min=1e-300)).float(), c).sort(-1).values.contiguous()
    mid = ((c[:, 1:] + c[:, :-1]) * 0.5).contiguous()
    a = torch.searchsorted(mid, x)
    return c, (wt * (x - c.gather(1, a)) ** 2).sum(-1)


def weighted_kmeans(x: torch.Tensor, weight: torch.Tensor | None, k: int, iters: int = 15) -> torch.Tensor:
    """Sorted centroids [R, k] of the 1-D points of each row of x [R, P] (weights [R, P] or [P]).

    Deterministic: Lloyd runs from a few inits that blend evenly spaced quantiles with an evenly
    spaced grid over [min, max] (INIT_MIXES = quantile share); the best run per row is kept.
    """
    x = x.float().contiguous()
    r, p = x.shape
    wt = torch.ones_like(x) if weight is None else weight.float().expand_as(x).clamp(min=0) + 1e-12
    xs, order = x.sort(-1)
    ws = wt.gather(1, order).double()
    zero = torch.zeros(r, 1, dtype=torch.float64)
    sums = (torch.cat([zero, ws.cumsum(1)], 1), torch.cat([zero, (ws * xs.double()).cumsum(1)], 1))
    frac = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    quant = xs[:, (frac * p).long().clamp(max=p - 1)]
    lo, hi = xs[:, :1], xs[:, -1:]
    even = lo + (hi - lo) * frac
    best_c, best_e = None, None
    for mix in INIT_MIXES:
        c, e = _lloyd(x, wt, xs, sums, (mix * quant + (1 - mix) * even).contiguous(), iters)
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


def quantize_groups(w: torch.Tensor, bits: int, weight: torch.Tensor | None = None,
                    iters: int = 15) -> tuple[torch.Tensor, Grid]:
    """A codebook per (row, group) of w [R, G, P] and the nearest codes: (codes uint8 [R, G, P], Grid of R*G rows).

    weight: importance broadcastable to [R, G, P] (diag(H) as [1, G, P]). Every (row, group) is an
    independent k-means, so all groups of a layer run as one batch, in chunks of CHUNK_ELEMENTS.

    Example:
        >>> codes, grid = quantize_groups(torch.randn(4, 2, 16), bits=2)
        >>> codes.shape, grid.levels.shape
        (torch.Size([4, 2, 16]), torch.Size([8, 4]))
    """
    if w.dim() != 3:
        raise ValueError(f"quantize_groups expects w [R, G, P], got shape {tuple(w.shape)}")
    rows, groups, size = w.shape
    w = w.float()
    step = max(1, CHUNK_ELEMENTS // max(groups * size, 1))
    codes = torch.empty(rows, groups, size, dtype=torch.uint8)
    parts = []
    for r0 in range(0, rows, step):
        x = w[r0:r0 + step].reshape(-1, size)
        wt = None
        if weight is not None:
            wt = weight.float()
            wt = (wt if wt.shape[0] == 1 else wt[r0:r0 + step]).expand(x.shape[0] // groups, groups, size)
            wt = wt.reshape(-1, size)
        grid = fit(x, bits, wt, iters)
        codes[r0:r0 + step] = nearest_codes(x, grid).view(-1, groups, size)
        parts.append(grid)
    grid = Grid(torch.cat([g.scale for g in parts]), torch.cat([g.levels for g in parts]),
                torch.cat([g.table_id for g in parts]))
    return codes, grid
