"""Uniform b-bit grids: symmetric (levels -2^(b-1) .. 2^(b-1)-1, scale = absmax / (2^(b-1)-1)) or
asymmetric (levels q - z for q in 0..2^b-1, z the zero point; one shared table per zero point).

An optional clip search shrinks the range per row (ratios 1.0 .. 0.55) and keeps the ratio with
the smallest weighted squared error: it helps at 2-4 bits on heavy-tailed weights.

Everything is vectorised over rows *and* groups (`quantize_groups` takes a [R, G, P] block) and
runs over cache-sized chunks of rows: a ratio costs a few in-place element-wise ops (rounding is
closed form, see `fxquant.quantizers.uniform_codes`), so a 4096 x 4096 weight with the clip
search takes a fraction of a second on one core. Results equal the row-by-row definition bit for
bit (same float formulas, same tie rule, first ratio wins ties).

Example:
    >>> import torch
    >>> g = fit(torch.tensor([[-1.0, 0.5, 1.0]]), bits=2, symmetric=True, clip_search=False)
    >>> g.values()
    tensor([[-2., -1.,  0.,  1.]])
"""
from __future__ import annotations

import torch

from . import Grid, uniform_codes

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(10))
CHUNK_ELEMENTS = 1 << 19  # fp32 elements per chunk (2 MiB): the working set of a ratio stays in cache


def _check_bits(bits: int, symmetric: bool) -> None:
    if not symmetric and bits >= 8:
        raise ValueError("8-bit asymmetric levels (q - z up to 255) do not fit the int8 level table; "
                         "use symmetric=True for 8 bits")


def _range_stats(x: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """Per (row, group) statistics the scale is computed from: (absmax,) or (min <= 0, max >= 0)."""
    if symmetric:
        return (x.abs().amax(-1),)
    return x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)


def _scale_offset(stats: tuple[torch.Tensor, ...], bits: int, symmetric: bool,
                  ratio: float) -> tuple[torch.Tensor, torch.Tensor | int]:
    """(scale, offset) of the grid clipped at `ratio`; offset = the code of level 0 (an int if shared)."""
    n_levels = 1 << bits
    if symmetric:
        scale = stats[0] * ratio / (n_levels // 2 - 1)
        return torch.where(scale > 0, scale, torch.ones_like(scale)), n_levels // 2
    lo, hi = stats[0] * ratio, stats[1] * ratio
    scale = (hi - lo) / (n_levels - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / scale).clamp(0, n_levels - 1).long()


def _chunk_error(x: torch.Tensor, wt: torch.Tensor | None, scale: torch.Tensor, offset: torch.Tensor | int,
                 n_levels: int, buf: torch.Tensor) -> torch.Tensor:
    """Weighted squared rounding error per (row, group) of x [r, G, P] on one grid, using `buf` as scratch."""
    s = scale[..., None]
    q = torch.div(x, s, out=buf).sub_(0.5).ceil_()
    if isinstance(offset, int):
        q.clamp_(-offset, n_levels - 1 - offset)
    else:
        off = offset[..., None].float()
        torch.clamp(q, -off, (n_levels - 1) - off, out=q)
    q.mul_(s).sub_(x).square_()
    if wt is not None:
        q.mul_(wt)
    return q.sum(-1)


def quantize_groups(w: torch.Tensor, bits: int, symmetric: bool = True, weight: torch.Tensor | None = None,
                    clip_search: bool | None = None, with_codes: bool = True
                    ) -> tuple[torch.Tensor | None, Grid]:
    """Fit a grid per (row, group) of w [R, G, P] and round onto it.

    weight: importance broadcastable to [R, G, P] (e.g. diag(H) as [1, G, P]); guides the clip search.
    Returns (codes uint8 [R, G, P] or None, Grid over the R*G (row, group) pairs in row-major order).

    Example:
        >>> codes, grid = quantize_groups(torch.randn(8, 4, 16), bits=4)
        >>> codes.shape, grid.scale.shape
        (torch.Size([8, 4, 16]), torch.Size([32]))
    """
    _check_bits(bits, symmetric)
    if w.dim() != 3:
        raise ValueError(f"quantize_groups expects w [R, G, P], got shape {tuple(w.shape)}")
    w = w.float()
    rows, groups, size = w.shape
    n_levels = 1 << bits
    ratios = CLIP_RATIOS if (bits <= 4 if clip_search is None else clip_search) else (1.0,)
    wt = None if weight is None else weight.float()
    if wt is not None and (wt.dim() != 3 or wt.shape[0] not in (1, rows)):
        raise ValueError(f"weight must broadcast to [R, G, P] = {tuple(w.shape)} with dim 3, got {tuple(wt.shape)}")
    scale = torch.empty(rows, groups)
    offset = torch.full((rows, groups), n_levels // 2, dtype=torch.long)
    codes = torch.empty(rows, groups, size, dtype=torch.uint8) if with_codes else None
    step = max(1, CHUNK_ELEMENTS // max(groups * size, 1))
    buf = torch.empty(min(step, rows), groups, size)
    for r0 in range(0, rows, step):
        x = w[r0:r0 + step]
        wt_chunk = None if wt is None else (wt if wt.shape[0] == 1 else wt[r0:r0 + step])
        stats = _range_stats(x, symmetric)
        best_s, best_off, best_err = None, None, None
        for ratio in ratios:
            s, off = _scale_offset(stats, bits, symmetric, ratio)
            if len(ratios) > 1:
                err = _chunk_error(x, wt_chunk, s, off, n_levels, buf[:x.shape[0]])
            if best_s is None:
                best_s, best_off = s, off
                best_err = err if len(ratios) > 1 else None
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            if not isinstance(off, int):
                best_off = torch.where(better, off, best_off)
        scale[r0:r0 + step] = best_s
        if not isinstance(best_off, int):
            offset[r0:r0 + step] = best_off
        if codes is not None:
            codes[r0:r0 + step] = uniform_codes(x, best_s, best_off, n_levels)
    scale, offset = scale.view(-1), offset.view(-1)
    levels = (torch.arange(n_levels)[None] - offset[:, None]).to(torch.int8)
    table_id = torch.zeros_like(offset) if symmetric else offset.clone()
    return codes, Grid(scale, levels, table_id, offset)


def fit(w: torch.Tensor, bits: int, symmetric: bool = True, weight: torch.Tensor | None = None,
        clip_search: bool | None = None) -> Grid:
    """Grid for each row of w [R, P]; `weight` [R, P] or [P] (importance, e.g. diag(H)) guides the clip search.

    clip_search None = on for bits <= 4.
    """
    r, p = w.shape
    wt = None
    if weight is not None:
        wt = weight.float().reshape(-1, p)
        wt = wt.view(wt.shape[0], 1, p)
    return quantize_groups(w.reshape(r, 1, p), bits, symmetric, wt, clip_search, with_codes=False)[1]


def tables(bits: int, symmetric: bool) -> torch.Tensor:
    """The shared int8 level tables: [1, 2^b] symmetric, [2^b, 2^b] asymmetric (row z = arange - z)."""
    n_levels = 1 << bits
    if symmetric:
        return (torch.arange(n_levels) - n_levels // 2).to(torch.int8)[None]
    return (torch.arange(n_levels)[None] - torch.arange(n_levels)[:, None]).to(torch.int8)
