"""GPTQ-style error-compensating rounding for any grid (uniform or codebook).

Columns are rounded in order; each column's rounding error is spread over the columns not yet
rounded through the Cholesky factor of H^-1 (H = E[x x^T] of the layer input, dampened by
`damp` * mean(diag H)), so the layer *output* error ||X (W - W_hat)^T|| shrinks, not the weight
error. Updates are applied lazily in blocks of `block` columns. Groups are fitted when the sweep
reaches them (from the already-updated weights); per-channel / per-tensor grids are fitted once.

Example:
    >>> import torch
    >>> from fxquant.quantizers import uniform
    >>> x = torch.randn(256, 16); w = torch.randn(8, 16)
    >>> codes, grids = gptq_round(w, x.T @ x / 256, lambda blk: uniform.fit(blk, 4), group_size=16)
    >>> codes.shape, len(grids)
    (torch.Size([8, 16]), 1)
"""
from __future__ import annotations

from typing import Callable

import torch

from . import Grid, grid_round


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag)*I)^-1, dampening more if H is not positive definite."""
    k = h.shape[0]
    mean_diag = h.diagonal().mean().clamp(min=1e-12)
    for attempt in range(6):
        hd = h + torch.eye(k, dtype=h.dtype) * damp * (10 ** attempt) * mean_diag
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("GPTQ: H stays singular after dampening; check calibration data (NaN or all zeros?)")


def gptq_round(w: torch.Tensor, h: torch.Tensor, fit: Callable[[torch.Tensor], Grid], group_size: int,
               block: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, list[Grid]]:
    """Round w [N, K] with error feedback; returns (codes long [N, K], one Grid per group of group_size columns).

    fit(block [N, P]) -> Grid with N rows: the format's grid for one group of columns.
    """
    w = w.detach().double().clone()
    n, k = w.shape
    h = h.detach().double().clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_cholesky(h, damp)
    codes = torch.zeros(n, k, dtype=torch.long)
    grids: list[Grid] = []
    grid = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col = i1 + j
            if col % group_size == 0:
                end = min(col + group_size, k)
                cur = w1[:, j:j + (end - col)]
                if end > i2:
                    cur = torch.cat([cur, w[:, i2:end]], 1)
                grid = fit(cur.float())
                grids.append(grid)
            c, q = grid_round(w1[:, j:j + 1].float(), grid)
            codes[:, col] = c[:, 0]
            e = (w1[:, j] - q[:, 0].double()) / u[col, col]
            w1[:, j:] -= e[:, None] * u[col, col:i2][None]
            err[:, j] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return codes, grids
