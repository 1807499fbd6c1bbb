"""Uniform b-bit grids: symmetric (levels -2^(b-1) .. 2^(b-1)-1, scale = absmax / (2^(b-1)-1)) or
asymmetric (levels q - z for q in 0..2^b-1, z the zero point; one shared table per zero point).

An optional clip search shrinks the range per row (ratios 1.0 .. 0.55) and keeps the ratio with
the smallest weighted squared error: it helps at 2-4 bits on heavy-tailed weights.

Example:
    >>> import torch
    >>> g = fit(torch.tensor([[-1.0, 0.5, 1.0]]), bits=2, symmetric=True, clip_search=False)
    >>> g.values()
    tensor([[-2., -1.,  0.,  1.]])
"""
from __future__ import annotations

import torch

from . import Grid, grid_round

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(10))


def _grid(w: torch.Tensor, bits: int, symmetric: bool, ratio: float) -> Grid:
    r = w.shape[0]
    n_levels = 1 << bits
    if symmetric:
        qmax = n_levels // 2 - 1
        scale = w.abs().amax(-1) * ratio / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        levels = (torch.arange(n_levels) - n_levels // 2).to(torch.int8).expand(r, -1)
        return Grid(scale.float(), levels.clone(), torch.zeros(r, dtype=torch.long))
    if bits >= 8:
        raise ValueError("8-bit asymmetric levels (q - z up to 255) do not fit the int8 level table; "
                         "use symmetric=True for 8 bits")
    lo = w.amin(-1).clamp(max=0) * ratio
    hi = w.amax(-1).clamp(min=0) * ratio
    scale = (hi - lo) / (n_levels - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, n_levels - 1).long()
    levels = (torch.arange(n_levels)[None] - zero[:, None]).to(torch.int8)
    return Grid(scale.float(), levels, zero)


def fit(w: torch.Tensor, bits: int, symmetric: bool = True, weight: torch.Tensor | None = None,
        clip_search: bool | None = None) -> Grid:
    """Grid for each row of w [R, P]; `weight` [R, P] or [P] (importance, e.g. diag(H)) guides the clip search.

    clip_search None = on for bits <= 4.
    """
    w = w.float()
    if clip_search is None:
        clip_search = bits <= 4
    if not clip_search:
        return _grid(w, bits, symmetric, 1.0)
    wt = torch.ones_like(w) if weight is None else weight.float().expand_as(w)
    best, best_err = None, None
    for ratio in CLIP_RATIOS:
        g = _grid(w, bits, symmetric, ratio)
        _, q = grid_round(w, g)
        err = ((q - w) ** 2 * wt).sum(-1)
        if best is None:
            best, best_err = g, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = Grid(torch.where(better, g.scale, best.scale), torch.where(better[:, None], g.levels, best.levels),
                    torch.where(better, g.table_id, best.table_id))
    return best


def tables(bits: int, symmetric: bool) -> torch.Tensor:
    """The shared int8 level tables: [1, 2^b] symmetric, [2^b, 2^b] asymmetric (row z = arange - z)."""
    n_levels = 1 << bits
    if symmetric:
        return (torch.arange(n_levels) - n_levels // 2).to(torch.int8)[None]
    return (torch.arange(n_levels)[None] - torch.arange(n_levels)[:, None]).to(torch.int8)
