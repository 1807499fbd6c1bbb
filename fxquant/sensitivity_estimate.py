"""Measure few candidates, estimate the rest: the sensitivity sweep's cheap proxy.

An exact sensitivity measurement runs the model (for Whisper: encoder, cross cache and a teacher-forced
decoder) once per candidate format of every tie group; with nine formats that is most of a mixed-precision
compile. Within one group the output error grows smoothly with the weight error, so each candidate gets a
cheap proxy first, the Hessian-weighted weight error sum_k E[x_k^2] * ||W[:, k] - Q(W)[:, k]||^2 (the
second-order output error of the layer, as in HAWQ / OBQ), and only a few *anchors* are measured exactly:
the candidates on the group's (cost, proxy) Pareto frontier nearest to the bit widths the budget will pick
from (avg_bits - 1, avg_bits, avg_bits + 1). The other candidates get log(error) = a + b * log(proxy)
fitted on the anchors (b = 1 with one anchor), so a candidate with more proxy error never scores better.

Example:
    >>> choose_anchors([8, 6, 4, 3, 2], [1.0, 4.0, 60.0, 300.0, 1500.0], [8, 6, 4, 3, 2], target_bits=4)
    [1, 2, 3]
    >>> est = estimate_errors([1.0, 4.0, 60.0], {1: 0.02, 2: 0.3})
    >>> round(est[0], 4), est[1], est[2]
    (0.005, 0.02, 0.3)
"""
from __future__ import annotations

import math

import torch

__all__ = ["ANCHORED_MIN_BITS", "weight_proxy", "pareto_frontier", "choose_anchors", "estimate_errors"]

SLOPE_RANGE = (0.5, 2.0)       # fitted log-log slopes are clamped here (1 = error proportional to proxy)
ANCHORED_MIN_BITS = 4.0        # sensitivity{measure=auto} anchors budgets of >= this many bits a weight only


def weight_proxy(w: torch.Tensor, wq: torch.Tensor, hdiag: torch.Tensor | None) -> float:
    """sum_k hdiag[k] * sum_n (w - wq)[n, k]^2 over a weight flattened to [N, K] (hdiag None: plain SSE).

    >>> weight_proxy(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([1.0, 0.0, 2.0]))
    6.0
    """
    d = (w.reshape(w.shape[0], -1).double() - wq.reshape(w.shape[0], -1).double()).pow(2).sum(0)
    if hdiag is None:
        return float(d.sum())
    return float((d * hdiag.double().reshape(-1)).sum())


def pareto_frontier(costs: list[float], proxies: list[float]) -> list[int]:
    """Indices of candidates that no other candidate beats on both cost and proxy (ties kept once).

    >>> pareto_frontier([4, 4, 3, 8], [1.0, 2.0, 5.0, 1.0])
    [0, 2]
    """
    keep = []
    for i, (c, p) in enumerate(zip(costs, proxies)):
        dominated = any((c2 <= c and p2 <= p) and (c2 < c or p2 < p or j < i)
                        for j, (c2, p2) in enumerate(zip(costs, proxies)) if j != i)
        if not dominated:
            keep.append(i)
    return keep


def choose_anchors(costs: list[float], proxies: list[float], bits: list[int], target_bits: float,
                   spread: int = 1) -> list[int]:
    """Frontier candidates nearest to target_bits, then target_bits -/+ 1 .. spread (distinct, sorted)."""
    frontier = pareto_frontier(costs, proxies)
    wanted = sorted((target_bits + d for d in range(-spread, spread + 1)), key=lambda w: abs(w - target_bits))
    chosen: list[int] = []
    for w in wanted:               # the nearest frontier candidate not chosen yet, cheaper first on ties
        left = [i for i in frontier if i not in chosen]
        if left:
            chosen.append(min(left, key=lambda i: (abs(bits[i] - w), costs[i])))
    return sorted(chosen)


def estimate_errors(proxies: list[float], measured: dict[int, float]) -> list[float]:
    """Every candidate's error: measured ones as measured; between two anchors, linear interpolation in
    (log proxy, log error); beyond the anchors, the fitted log-log slope (clamped to SLOPE_RANGE) from the
    nearest anchor."""
    if not measured:
        raise ValueError("estimate_errors needs at least one measured candidate")
    tiny = 1e-30
    pts = sorted((math.log(max(proxies[i], tiny)), math.log(max(e, tiny))) for i, e in measured.items())
    slope = 1.0
    if len(pts) > 1:
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        if sxx > 1e-12:
            slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    slope = min(max(slope, SLOPE_RANGE[0]), SLOPE_RANGE[1])
    out = []
    for i, p in enumerate(proxies):
        if i in measured:
            out.append(measured[i])
            continue
        x = math.log(max(p, tiny))
        if x <= pts[0][0]:
            y = pts[0][1] + slope * (x - pts[0][0])
        elif x >= pts[-1][0]:
            y = pts[-1][1] + slope * (x - pts[-1][0])
        else:
            (x0, y0), (x1, y1) = next((a, b) for a, b in zip(pts, pts[1:]) if a[0] <= x <= b[0])
            y = y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0
        out.append(math.exp(y))
    return out
