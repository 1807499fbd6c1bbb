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
               block: int = 128, damp: float = 0.01, act_order: bool = False,
               refit: bool = False) -> tuple[torch.Tensor, list[Grid]]:
    """Round w [N, K] with error feedback; returns (codes long [N, K], one Grid per group of group_size columns).

    fit(block [N, P]) -> Grid with N rows: the format's grid for one group of columns; it is called once per
    group, in column order.

    act_order: round the columns in decreasing diag(H) (the most energetic inputs first, while the most
    columns remain to absorb their error); the grids are then fitted up front on the original weights
    ("static groups"), so the grid layout stays one per group of consecutive columns.
    refit: after rounding, re-solve the levels of codebook grids (`Grid.offset is None`) for the codes chosen,
    minimising the output error (`refit_levels`); ignored for uniform grids. Off by default: on Whisper
    tiny.en's decoder (516 calibration rows for K = 384) act order + refit measured worse (see
    benchmarks/STUDY-whisper-3bit.md).
    """
    w0 = w.detach().float()
    w = w.detach().double().clone()
    n, k = w.shape
    h = h.detach().double().clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    codes = torch.zeros(n, k, dtype=torch.long)
    grids: list[Grid] = []
    if act_order:
        grids = [fit(w[:, s:s + group_size].float()) for s in range(0, k, group_size)]
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        perm = torch.arange(k)
    identity = not act_order
    wp, hp = (w, h) if identity else (w[:, perm].contiguous(), h[perm][:, perm].contiguous())
    u = _inverse_cholesky(hp, damp)
    grid = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wp[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col = i1 + j
            if identity:
                if col % group_size == 0:
                    end = min(col + group_size, k)
                    cur = w1[:, j:j + (end - col)]
                    if end > i2:
                        cur = torch.cat([cur, wp[:, i2:end]], 1)
                    grid = fit(cur.float())
                    grids.append(grid)
            else:
                grid = grids[int(perm[col]) // group_size]
            c, q = grid_round(w1[:, j:j + 1].float(), grid)
            codes[:, int(perm[col])] = c[:, 0]
            e = (w1[:, j] - q[:, 0].double()) / u[col, col]
            w1[:, j:] -= e[:, None] * u[col, col:i2][None]
            err[:, j] = e
        wp[:, i2:] -= err @ u[i1:i2, i2:]
    if refit and all(g.offset is None for g in grids):
        grids = refit_levels(w0, h, codes, grids, group_size, damp)
    return codes, grids


def refit_levels(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, grids: list[Grid], group_size: int,
                 damp: float = 0.01, rows_per_chunk: int = 64) -> list[Grid]:
    """Codebook levels re-solved for fixed codes: min over the values c of  (w - c[codes]) H (w - c[codes])^T.

    Per row the unknowns are the L levels of each of its G groups; with O the [K, G*L] one-hot of the codes,
    c = (O^T H O + lam I)^-1 (O^T H w + lam c_old) (lam = damp * mean diag(O^T H O): unused levels keep their
    old value). The values are stored again as int8 levels + a scale (`codebook.to_int8`), sorted, with the
    codes renumbered in place. Never worse than the input grids on the output error up to the int8 rounding
    of the levels (the old values are kept for a row if the new ones measure worse).
    """
    from .codebook import to_int8

    n, k = codes.shape
    n_levels = grids[0].levels.shape[1]
    g = len(grids)
    wd, hd = w.double(), h.double()
    old = torch.stack([gr.values().double() for gr in grids], 1)          # [N, G, L]
    group_of = torch.arange(k) // group_size                                # [K]
    new_vals = old.clone()
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n)
        idx = group_of[None] * n_levels + codes[r0:r1]                      # [r, K] unknown index per column
        o = torch.zeros(r1 - r0, k, g * n_levels, dtype=torch.float64)
        o.scatter_(2, idx[..., None], 1.0)
        ho = torch.einsum("ij,rjm->rim", hd, o)                             # H O   [r, K, GL]
        m = torch.einsum("rim,rin->rmn", o, ho)                             # O^T H O
        rhs = torch.einsum("rim,ri->rm", ho, wd[r0:r1])                     # O^T H w
        lam = damp * m.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-12)    # [r]
        c_old = old[r0:r1].reshape(r1 - r0, -1)
        eye = torch.eye(g * n_levels, dtype=torch.float64)
        c = torch.linalg.solve(m + lam[:, None, None] * eye, (rhs + lam[:, None] * c_old)[..., None])[..., 0]

        def err(vals):
            d = wd[r0:r1] - vals.gather(1, idx)
            return ((d @ hd) * d).sum(1)

        keep = err(c) > err(c_old)
        new_vals[r0:r1] = torch.where(keep[:, None], c_old, c).view(r1 - r0, g, n_levels)
    out = []
    for j in range(g):
        vals, order = new_vals[:, j].float().sort(-1)
        rank = torch.argsort(order, -1)                                     # old index -> new index
        cols = slice(j * group_size, min((j + 1) * group_size, k))
        codes[:, cols] = rank.gather(1, codes[:, cols])
        out.append(to_int8(vals))
    return out
