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
    """

    scale: torch.Tensor
    levels: torch.Tensor
    table_id: torch.Tensor

    def values(self) -> torch.Tensor:
        return self.scale[:, None] * self.levels.float()

    def expand(self, rows: int) -> "Grid":
        """A 1-row grid (per-tensor) repeated for `rows` rows."""
        return Grid(self.scale.expand(rows).clone(), self.levels.expand(rows, -1).clone(),
                    self.table_id.expand(rows).clone())


def nearest_codes(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Index (0..L-1, into the grid's level row) of the nearest representable value: long [R, P]."""
    vals, order = grid.values().sort(-1)
    mid = ((vals[:, 1:] + vals[:, :-1]) * 0.5).contiguous()
    idx = torch.searchsorted(mid, w.float().contiguous())
    return order.gather(1, idx)


def grid_round(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes long [R, P], quantized values fp32 [R, P]) of w on the grid."""
    codes = nearest_codes(w, grid)
    return codes, grid.values().gather(1, codes)
