"""Weight quantizers behind the format registry (fxquant.formats).

Every quantizer works on one block of a weight matrix, rows x columns, and returns a `Grid`: per
row a float scale and a sorted row of int8 levels, so the representable values of row r are
`scale[r] * levels[r]`. `fxquant.formats` assembles grids of all groups into a `QuantizedWeight`.

- uniform.py:  symmetric / asymmetric b-bit grids (with an MSE clip search)
- codebook.py: weighted k-means (Lloyd) codebooks, int8 tables + a float scale
- gptq.py:     error-compensating rounding from input second moments H, for any grid

Example:
    >>> import torch
    >>> from fxquant.quantizers import uniform, nearest_codes
    >>> g = uniform.fit(torch.randn(4, 32), bits=4, symmetric=True)
    >>> nearest_codes(torch.randn(4, 32), g).shape
    torch.Size([4, 32])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Grid:
    """Representable values of R rows: scale [R] fp32 * levels [R, L] int8 (sorted ascending).

    table_id [R] long: index of a shared level table (uniform: 0, or the zero point for asymmetric),
    -1 when the row owns its table (codebooks).
    offset [R] long or None: set for uniform grids, whose levels are `arange(L) - offset`; rounding
    onto them is then closed form (no sort, no searchsorted).
    """

    scale: torch.Tensor
    levels: torch.Tensor
    table_id: torch.Tensor
    offset: torch.Tensor | None = None

    def values(self) -> torch.Tensor:
        return self.scale[:, None] * self.levels.float()

    def expand(self, rows: int) -> "Grid":
        """A 1-row grid (per-tensor) repeated for `rows` rows."""
        offset = None if self.offset is None else self.offset.expand(rows).clone()
        return Grid(self.scale.expand(rows).clone(), self.levels.expand(rows, -1).clone(),
                    self.table_id.expand(rows).clone(), offset)

    def sorted_midpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order [R, L], midpoints [R, L-1]) of the sorted values, computed once per grid."""
        cached = self.__dict__.get("_midpoints")
        if cached is None:
            vals, order = self.values().sort(-1)
            cached = (order, ((vals[:, 1:] + vals[:, :-1]) * 0.5).contiguous())
            self.__dict__["_midpoints"] = cached
        return cached


BOUNDARY_TOL = 2.0 ** -12  # |w/s - (l + 1/2)| below this (in steps) is re-checked against the float midpoints


def uniform_codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | int, n_levels: int) -> torch.Tensor:
    """Nearest code of w [..., P] on levels `(arange(n_levels) - offset) * scale` (scale, offset [...]): long.

    Closed form, ceil(w / s - 1/2) clamped to the levels; the few values within BOUNDARY_TOL of a
    rounding boundary are re-decided by comparing with the float midpoints `(s*l + s*(l+1)) / 2`,
    so the result equals a searchsorted over the midpoints bit for bit (ties go to the lower level).
    The tolerance is far above the rounding error of w / s (|w / s| < 1000 for every grid here;
    beyond the last level clamping decides).
    """
    s = scale[..., None]
    off = offset[..., None].float() if isinstance(offset, torch.Tensor) else float(offset)
    lo, hi = -off, (n_levels - 1) - off
    y = torch.div(w, s)
    lvl = y.sub(0.5).ceil_()
    near = y.sub_(lvl).abs_().sub_(0.5).abs_() <= BOUNDARY_TOL
    lvl = torch.clamp(lvl, lo, hi) if isinstance(off, torch.Tensor) else lvl.clamp_(lo, hi)
    idx = near.view(-1).nonzero().squeeze(1)
    if idx.numel():
        size = w.shape[-1]
        row = idx // size
        s_n, w_n, l_n = scale.reshape(-1)[row], w.reshape(-1)[idx], lvl.view(-1)[idx]
        lo_n = -offset.reshape(-1)[row].float() if isinstance(offset, torch.Tensor) else lo
        hi_n = lo_n + (n_levels - 1)
        here = l_n * s_n
        down = (w_n <= (here + (l_n - 1) * s_n) * 0.5) & (l_n > lo_n)
        up = (w_n > ((l_n + 1) * s_n + here) * 0.5) & (l_n < hi_n)
        lvl.view(-1)[idx] = l_n - down.float() + up.float()
    return lvl.add_(off).long()


def nearest_codes(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Index (0..L-1, into the grid's level row) of the nearest representable value: long [R, P]."""
    w = w.float().contiguous()
    if grid.offset is not None:
        return uniform_codes(w, grid.scale, grid.offset, grid.levels.shape[1])
    order, mid = grid.sorted_midpoints()
    idx = torch.searchsorted(mid, w)
    return order.gather(1, idx)


def grid_round(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes long [R, P], quantized values fp32 [R, P]) of w on the grid."""
    codes = nearest_codes(w, grid)
    if grid.offset is not None:
        return codes, grid.scale[:, None] * (codes - grid.offset[:, None]).float()
    return codes, grid.values().gather(1, codes)
