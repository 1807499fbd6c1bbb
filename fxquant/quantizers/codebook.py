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

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import torch

from . import Grid, nearest_codes

CHUNK_ELEMENTS = 1 << 18  # weights per k-means chunk: rows are independent, chunks bound memory; large enough
# that two Python threads overlap (tiny.en's token table at 4 bits: 3.3 s on one thread, 1.6 s on two)


INIT_MIXES = (1.0, 0.65, 0.5, 0.35)


def _lloyd(sorted_x: torch.Tensor, sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor], c: torch.Tensor,
           iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd steps from sorted centroids c [R, k]; returns (centroids, weighted error [R]).

    On sorted points a cluster is a contiguous run, so each step only searches the k-1 midpoints
    in the sorted row and reads the cluster sums off prefix sums (`sums`: float64 [R, P+1] of wt,
    wt*x and wt*x^2 in sorted order): O(k log P) per row and step instead of O(P), the final error
    too (sum over clusters of S(wx^2) - 2 c S(wx) + c^2 S(w)). Points on a midpoint join the lower
    cluster, as searchsorted(mid, x) decides.
    """
    r, p = c.shape[0], sorted_x.shape[1]
    cum_w, cum_wx, cum_wx2 = sums
    first, last = torch.zeros(r, 1, dtype=torch.long), torch.full((r, 1), p, dtype=torch.long)

    def cluster_sums(cents):
        mid = ((cents[:, 1:] + cents[:, :-1]) * 0.5).contiguous()
        bounds = torch.cat([first, torch.searchsorted(sorted_x, mid, right=True), last], 1)
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        return [s.gather(1, hi) - s.gather(1, lo) for s in (cum_w, cum_wx, cum_wx2)]

    for _ in range(iters):
        den, num, _ = cluster_sums(c)
        new = torch.where(den > 0, (num / den.clamp(min=1e-300)).float(), c)
        if not bool((new[:, 1:] >= new[:, :-1]).all()):   # only an empty cluster can break the order
            new = new.sort(-1).values.contiguous()
        if torch.equal(new, c):      # a fixed point: further steps would not move any centroid
            break
        c = new
    den, num, sq = cluster_sums(c)
    cd = c.double()
    return c, (sq - 2 * cd * num + cd * cd * den).sum(-1).clamp(min=0)


@contextmanager
def _one_torch_thread() -> Iterator[int]:
    """k-means runs many small ops: on one torch thread it is as fast as on two (tiny.en's token table at
    4 bits: 5.2 s vs 5.7 s) and cannot stall on OpenMP workers that lost their core (51 s with one core
    busy). Wraps every k-means (`weighted_kmeans`: per-row codebooks, shared tables, GPTQ's group fits) and
    quantize_groups, which runs its chunks on as many Python threads as torch had threads (yielded here):
    torch releases the GIL inside each op, and a preempted thread only delays its own chunks."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield old
    finally:
        torch.set_num_threads(old)


@_one_torch_thread()
def weighted_kmeans(x: torch.Tensor, weight: torch.Tensor | None, k: int, iters: int = 15) -> torch.Tensor:
    """Sorted centroids [R, k] of the 1-D points of each row of x [R, P] (weights [R, P] or [P]).

    Deterministic: Lloyd runs from a few inits that blend evenly spaced quantiles with an evenly
    spaced grid over [min, max] (INIT_MIXES = quantile share); the best run per row is kept.
    """
    return _kmeans_rows(x, weight, k, iters)


def _kmeans_rows(x: torch.Tensor, weight: torch.Tensor | None, k: int, iters: int) -> torch.Tensor:
    """weighted_kmeans on the caller's torch threads (quantize_groups' workers run it on one each)."""
    x = x.float().contiguous()
    r, p = x.shape
    wt = torch.ones_like(x) if weight is None else weight.float().expand_as(x).clamp(min=0) + 1e-12
    xs, order = x.sort(-1)
    ws = wt.gather(1, order).double()
    zero = torch.zeros(r, 1, dtype=torch.float64)
    xd = xs.double()
    sums = tuple(torch.cat([zero, t.cumsum(1)], 1) for t in (ws, ws * xd, ws * xd * xd))
    frac = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    quant = xs[:, (frac * p).long().clamp(max=p - 1)]
    lo, hi = xs[:, :1], xs[:, -1:]
    even = lo + (hi - lo) * frac
    best_c, best_e = None, None
    for mix in INIT_MIXES:
        c, e = _lloyd(xs, sums, (mix * quant + (1 - mix) * even).contiguous(), iters)
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


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"codebook bits must be in 2..8, got {bits}")


def fit(w: torch.Tensor, bits: int, weight: torch.Tensor | None = None, iters: int = 15) -> Grid:
    """Codebook grid (2^bits int8 levels + scale) for each row of w [R, P]."""
    _check_bits(bits)
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
    _check_bits(bits)
    rows, groups, size = w.shape
    w = w.float()
    step = max(1, CHUNK_ELEMENTS // max(groups * size, 1))
    codes = torch.empty(rows, groups, size, dtype=torch.uint8)

    def chunk(r0: int) -> Grid:
        x = w[r0:r0 + step].reshape(-1, size)
        wt = None
        if weight is not None:
            wt = weight.float()
            wt = (wt if wt.shape[0] == 1 else wt[r0:r0 + step]).expand(x.shape[0] // groups, groups, size)
            wt = wt.reshape(-1, size)
        grid = to_int8(_kmeans_rows(x, wt, 1 << bits, iters))
        codes[r0:r0 + step] = nearest_codes(x, grid).view(-1, groups, size)
        return grid

    starts = range(0, rows, step)
    with _one_torch_thread() as threads:
        if threads > 1 and len(starts) > 1:
            with ThreadPoolExecutor(min(threads, len(starts))) as pool:
                parts = list(pool.map(chunk, starts))
        else:
            parts = [chunk(r0) for r0 in starts]
    grid = Grid(torch.cat([g.scale for g in parts]), torch.cat([g.levels for g in parts]),
                torch.cat([g.table_id for g in parts]))
    return codes, grid


SHARED_RATIOS = (1.0, 0.85)   # row scale = absmax * ratio / 127, the best per row is kept
SHARED_CANDIDATES = 8         # tables tried per row: the nearest to its own k-means levels


def shared_tables(w: torch.Tensor, bits: int, n_tables: int = 256, weight: torch.Tensor | None = None,
                  iters: int = 10, seed: int = 0) -> tuple[torch.Tensor, Grid]:
    """Codebooks shared by rows: n_tables int8 tables of 2^b levels, each row of w [R, P] picks one + its scale.

    The LUT contract (W = scale[r] * table[index[r], code]) lets rows share tables; storing an index
    (8 bits for <= 256 tables) instead of a table per row saves 2^b * 8 - 8 bits a row (56 at 3 bits:
    0.15 bit a weight for K = 384). Rows are fitted as in `fit` (weighted k-means), their centroids
    normalised by the row's absmax and clustered (k-means in R^(2^b), deterministic init from the rows
    in absmax order); each row then takes, of its SHARED_CANDIDATES nearest tables, the table and the scale (absmax * SHARED_RATIOS / 127) that minimise
    its weighted squared error. Returns (codes long [R, P], Grid with `table_id` = the table of each row
    and `levels` = that table, per row).

    Example:
        >>> codes, g = shared_tables(torch.randn(64, 32), bits=2, n_tables=4)
        >>> int(g.table_id.max()) < 4 and codes.shape == (64, 32)
        True
    """
    w = w.float()
    r, p = w.shape
    k = 1 << bits
    n_tables = max(1, min(n_tables, r))
    wt = torch.ones(1, p) if weight is None else weight.float().reshape(-1, p).clamp(min=0) + 1e-12
    cent = weighted_kmeans(w, None if weight is None else wt, k, iters=15)          # [R, k] sorted
    amax = w.abs().amax(1).clamp(min=1e-12)
    prof = cent / amax[:, None]                                                   # [R, k] in [-1, 1]
    gen = torch.Generator().manual_seed(seed)
    tables = prof[torch.randperm(r, generator=gen)[:n_tables]].clone()
    for _ in range(iters):
        assign = torch.cdist(prof, tables).argmin(1)
        sums = torch.zeros_like(tables).index_add_(0, assign, prof)
        counts = torch.bincount(assign, minlength=n_tables).float()
        tables = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], tables)
    tables = tables.sort(1).values
    amax_t = tables.abs().amax(1).clamp(min=1e-12)
    levels = torch.round(tables / amax_t[:, None] * 127).clamp(-127, 127)         # int8 tables [T, k]
    best_err = torch.full((r,), float("inf"))
    best = (torch.zeros(r, dtype=torch.long), torch.ones(r))
    unit = amax / 127.0
    cand = torch.cdist(prof, tables).topk(min(SHARED_CANDIDATES, n_tables), largest=False).indices   # [R, c]
    for j in range(cand.shape[1]):                          # of the nearest tables, the one that fits the row best
        lv = levels[cand[:, j]]                                                   # [R, k]
        for ratio in SHARED_RATIOS:
            vals = (unit * ratio)[:, None] * lv
            mid = ((vals[:, 1:] + vals[:, :-1]) * 0.5).contiguous()
            err = (wt * (w - vals.gather(1, torch.searchsorted(mid, w))) ** 2).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better, cand[:, j], best[0]), torch.where(better, unit * ratio, best[1]))
    table_id, scale = best
    grid = Grid(scale.float(), levels[table_id].to(torch.int8), table_id)
    return nearest_codes(w, grid), grid
