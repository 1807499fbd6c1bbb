"""assign-precision (analysis): write meta[ir.DECISION] on every quantizable node.

Config keys read (compile_lowbit options): bits, avg_bits, budget_bytes (exclusive), scheme
("uniform" | "codebook" | "auto"), rules, group_size (default 64), act_bits (8), act_mode
("dynamic"), gptq (bool -> rounding "gptq"), symmetric (True), depthwise_bits (8; None = no
default for depthwise convs), tie_siblings (True).

- bits=B: every node W<B> (B <= 4: uniform group 64, clamped to K; >= 5: per-channel), decided_by "bits=B".
- avg_bits / budget_bytes: per tie group the candidate minimising summed sensitivity under the budget
  (fxquant.sensitivity.solve); decided_by "budget:avg_bits=3" / "budget:budget_bytes=N". Without a
  sensitivity pass before it, a proxy is used: diag(H)-weighted relative weight error.
- neither: W8 per-channel A8, decided_by "default:W8".
- Rules (fxquant.rules) pin nodes ("rule:<pattern>"); depthwise convs default to depthwise_bits
  ("default:depthwise=8"): their bytes are negligible but they count in the average honestly.
Provides PrecisionPlan (fxquant.analysis): the decisions and avg_bits, bytes, params.

Example:
    >>> import torch, fxquant.tracing as c
    >>> from fxquant.registry import PassContext
    >>> gm = c.capture(torch.nn.Linear(128, 4), (torch.randn(2, 128),))
    >>> _ = assign_precision(gm, PassContext(config={"bits": 4}))
    >>> next(n for n in gm.graph.nodes if n.op == "call_function").meta["fxq_decision"].label()
    'W4 uniform/g64 A8'
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.analysis import PrecisionPlan
from fxquant.errors import ConfigError
from fxquant.formats import quantize_weight
from fxquant.qweight import dequantize
from fxquant.quantizers import nodes as qn
from fxquant.registry import PassResult, register_pass
from fxquant.sensitivity import budget_mode, plan, solve

PASS = "assign-precision"


def _proxy_sensitivity(gm: fx.GraphModule, nodes: list[fx.Node], d: ir.QuantDecision) -> float:
    total = 0.0
    for node in nodes:
        w = ir.node_weight(gm, node).detach().reshape(ir.node_weight(gm, node).shape[0], -1).float()
        hd = (node.meta.get(ir.ACT_STATS) or {}).get("hdiag")
        hd = torch.ones(w.shape[1]) if hd is None else hd.float()
        qw = quantize_weight(w, d.weight_bits, d.scheme, d.granularity, d.group_size, d.symmetric, hdiag=hd,
                             where=qn.describe(node))
        err = ((dequantize(qw) - w).pow(2) * hd).sum().item()
        total += err / max((w.pow(2) * hd).sum().item(), 1e-30)
    return total


@register_pass(PASS, kind="analysis", provides=(PrecisionPlan,))
def assign_precision(gm: fx.GraphModule, ctx) -> PassResult:
    """Decide a QuantDecision per quantizable node from bits / budget / rules."""
    config = ctx.config or {}
    mode, budget, label = budget_mode(config)
    groups = plan(gm, config)
    by_name = {n.name: n for n in gm.graph.nodes}
    metric = "bits" if mode == "bits" else "bytes"
    float_params = ir.unquantized_weight_params(gm)       # LSTM/GRU weights stay fp32 and count at 32 bits
    total_params = sum(g.params for g in groups) + float_params
    free = [g for g in groups if g.pinned is None]
    if free:
        limit = budget * total_params if mode == "bits" else budget
        pinned_cost = sum(g.cost(g.pinned, metric) for g in groups if g.pinned is not None) + \
            (32 * float_params if metric == "bits" else 4 * float_params)
        options = []
        for g in free:
            sens = by_name[g.names[0]].meta.get(ir.SENSITIVITY) or {}
            row = []
            for cand in g.candidates:
                s = sens.get(cand.label())
                if s is None:
                    s = _proxy_sensitivity(gm, [by_name[n] for n in g.names], cand)
                row.append((g.cost(cand, metric), s))
            options.append(row)
        remaining = limit - pinned_cost
        try:
            picks = solve(options, remaining)
        except ConfigError:
            need = pinned_cost + sum(min(c for c, _ in row) for row in options)
            unit = (f"avg_bits >= {need / total_params:.3f}" if mode == "bits" else f"budget_bytes >= {need}")
            raise ConfigError(f"{label.split(':', 1)[1]} is below the smallest achievable size: the cheapest "
                              f"candidates plus pinned nodes need {unit}. Raise the budget or relax rules "
                              f"(pinned nodes cost {pinned_cost}, "
                              f"{'bits' if mode == 'bits' else 'bytes'})") from None
        for g, j in zip(free, picks):
            g.pinned = g.candidates[j]
    bits_sum = sum(g.cost(g.pinned, "bits") for g in groups) + 32 * float_params
    bytes_sum = sum(g.cost(g.pinned, "bytes") for g in groups) + 4 * float_params
    decisions = {}
    for g in groups:
        for name in g.names:
            ir.set_decision(by_name[name], g.pinned, PASS)
            decisions[name] = by_name[name].meta[ir.DECISION]
    avg = bits_sum / max(total_params, 1)
    ctx.analyses.set(PrecisionPlan(avg_bits=avg, bytes=bytes_sum, params=total_params, decisions=decisions))
    return PassResult(changed=False, message=f"{sum(len(g.names) for g in groups)} nodes decided; "
                                             f"avg {avg:.3f} weight bits, {bytes_sum} bytes"
                                             + (f" ({label})" if label else ""))
