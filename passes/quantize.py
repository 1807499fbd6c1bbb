"""quantize (analysis of weights; the graph is unchanged): pack every decided node's weight.

For each quantizable node with a non-float meta[ir.DECISION]: a QuantizedWeight (fxquant.formats)
in ctx.state["qweights"][node.name]; k-means / clip search weighted by the calibrated diag(H);
rounding "gptq" uses the calibrated H (nodes without H, i.e. grouped convs or K > max_h_dim, fall
back to nearest rounding, noted in provenance). meta[ir.QUANT_STATS] on every quantizable node:
    {"bytes": packed bytes, "fp32_bytes": 4 * params, "params": N*K, "sqnr_db": output SQNR of the
     lowered op (its exact reference semantics, incl. int8 activations) vs fp32 on a calibration
     sample (None without calibration)}.
Float nodes get bytes == fp32_bytes and sqnr_db inf.

Example:
    >>> import torch, fxquant.tracing as c
    >>> from fxquant.registry import PassContext
    >>> gm = c.capture(torch.nn.Linear(64, 8), (torch.randn(4, 64),))
    >>> from passes.calibrate import calibrate                        # doctest: +SKIP
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.formats import quantize_weight, sqnr_db
from fxquant.qweight import QuantizedWeight
from fxquant.quantizers import nodes as qn
from fxquant.registry import PassResult, register_pass

PASS = "quantize"


def quantize_node(gm: fx.GraphModule, node: fx.Node) -> QuantizedWeight:
    """QuantizedWeight of one decided node (uses meta ACT_STATS when present)."""
    d: ir.QuantDecision = node.meta[ir.DECISION]
    stats = node.meta.get(ir.ACT_STATS) or {}
    hessian = stats.get("H") if d.rounding == "gptq" else None
    rounding = d.rounding
    if rounding == "gptq" and hessian is None:
        rounding = "nearest"
        why = "no calibration H (run calibrate)" if not stats else "H not collected (grouped conv or K too large)"
        ir.add_provenance(node, PASS, f"gptq -> nearest rounding: {why}")
    return quantize_weight(ir.node_weight(gm, node), d.weight_bits, d.scheme, d.granularity, d.group_size,
                           d.symmetric, hdiag=stats.get("hdiag"), hessian=hessian, rounding=rounding,
                           where=qn.describe(node))


def output_sqnr(gm: fx.GraphModule, node: fx.Node, qw: QuantizedWeight, x: torch.Tensor) -> float:
    """SQNR (dB) of the lowered op's output vs the fp32 op on input x."""
    from .lower import make_op

    w = ir.node_weight(gm, node)
    b = qn.bias_of(node)
    bias = ir.get_attr_value(gm, b.target) if isinstance(b, fx.Node) and b.op == "get_attr" else None
    with torch.no_grad():
        ref = qn.run_node(node, x.float(), w.float(), None if bias is None else bias.float())
        out = make_op(gm, node, qw)(x.float())
    return sqnr_db(ref, out)


@register_pass(PASS, kind="analysis")
def quantize(gm: fx.GraphModule, ctx) -> PassResult:
    """Compute QuantizedWeight + QUANT_STATS for every decided node."""
    qweights = ctx.state.setdefault("qweights", {})
    samples = ctx.state.get("calib_samples") or {}
    count, total, fp32 = 0, 0, 0
    for node in gm.graph.nodes:
        if not ir.is_quantizable(node):
            continue
        w = ir.node_weight(gm, node)
        d = node.meta.get(ir.DECISION)
        stats = {"params": w.numel(), "fp32_bytes": 4 * w.numel()}
        if d is None or d.weight_bits is None:
            stats.update(bytes=4 * w.numel(), sqnr_db=float("inf"))
        else:
            qw = quantize_node(gm, node)
            qweights[node.name] = qw
            sample = samples.get(node.name)
            stats.update(bytes=qw.nbytes(), sqnr_db=None if sample is None else output_sqnr(gm, node, qw, sample))
            ir.add_provenance(node, PASS, f"{d.label()}: {qw.nbytes()} bytes"
                                          + (f", SQNR {stats['sqnr_db']:.1f} dB" if stats["sqnr_db"] is not None else ""))
            count += 1
        node.meta[ir.QUANT_STATS] = stats
        total += stats["bytes"]
        fp32 += stats["fp32_bytes"]
    return PassResult(changed=False, message=f"{count} weights packed: {total} bytes ({fp32} fp32, "
                                             f"x{fp32 / max(total, 1):.2f})")
