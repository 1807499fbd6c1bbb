"""awq-scale (transform): activation-aware per-channel scaling of LayerNorm-fed linears (AWQ-style).

A LayerNorm's output feeds the transformer's projections (q/k/v, fc1). Its channels differ widely in
magnitude, and a low-bit weight grid spends its levels evenly across input channels. For a channel
scale s (one per input channel, shared by every linear reading the norm), `linear(ln(x), W)` equals
`linear(ln'(x), W * s)` with the norm's weight and bias divided by s: exact in float, but the scaled
weight quantizes the columns that meet large activations more finely (the channels the output depends
on most), and the normalised activations become flatter, which also helps per-token int8 activations.
Per norm, s = E[x_k^2]^(alpha/2), normalised to geometric mean 1, with alpha from a grid chosen to
minimise the calibrated output error sum_n (W_n - Q(W_n s)/s) H (W_n - Q(W_n s)/s)^T of a nominal
format (default 4-bit uniform, group 64), H = E[x x^T] from `calibrate`. alpha = 0 (no scaling) is in
the grid, so the pass never makes that error worse. The calibration statistics of the scaled linears
are rescaled to match. Weights shared with another node (a tied embedding table) are never scaled;
the model's own tensors are never written (new buffers are registered on the graph module).

Example:
    cleanup,fold-bn,const-fold,linearize,propagate-shapes,calibrate,awq-scale,sensitivity,...
    awq-scale{bits=4,group=64}
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.analysis import CalibrationData
from fxquant.formats import quantize_weight
from fxquant.graphutil import insert_get_attr, remove_dead_nodes, set_constant
from fxquant.qweight import dequantize
from fxquant.registry import PassResult, register_pass

PASS = "awq-scale"
LAYER_NORM = torch.ops.aten.layer_norm.default
ALPHAS = tuple(i / 10 for i in range(11))


@dataclass
class AwqScaleOptions:
    bits: int = 4            # nominal weight format the scales are searched for
    group: int = 64
    max_k: int = 4096        # larger inputs have no full H from calibrate: skipped


def _linear_users(gm: fx.GraphModule, ln: fx.Node) -> list[fx.Node] | None:
    users = list(ln.users)
    if not users or not all(ir.is_quantizable(u) and u.target in ir.LINEAR_TARGETS and u.args[0] is ln
                            for u in users):
        return None
    return users


def _shared(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when the node's weight tensor is also read by another node (e.g. a tied embedding lookup)."""
    w = ir.node_weight(gm, node)
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n is not node.args[1]
               and isinstance(ir.get_attr_value(gm, n.target), torch.Tensor)
               and ir.get_attr_value(gm, n.target).data_ptr() == w.data_ptr()]
    return bool(readers) or len(node.args[1].users) > 1


def _error(w: torch.Tensor, h: torch.Tensor, s: torch.Tensor, bits: int, group: int) -> float:
    qw = quantize_weight(w * s, bits, "uniform", "group", min(group, w.shape[1]), True)
    delta = (w - dequantize(qw).view_as(w) / s).double()
    return float(((delta @ h) * delta).sum())


def _search(gm, users, opts) -> tuple[torch.Tensor, float, float, float] | None:
    stats = [u.meta.get(ir.ACT_STATS) or {} for u in users]
    if any(st.get("H") is None or st.get("hdiag") is None for st in stats):
        return None
    h = stats[0]["H"].double()
    mag = stats[0]["hdiag"].double().clamp_min(1e-12).sqrt()
    weights = [ir.node_weight(gm, u).detach().float() for u in users]
    best = None
    for alpha in ALPHAS:
        s = mag.pow(alpha)
        s = (s / s.log().mean().exp()).float().clamp(1e-4, 1e4)
        err = sum(_error(w, h, s, opts.bits, opts.group) for w in weights)
        if best is None or err < best[1]:
            best = (s, err, alpha)
    base = sum(_error(w, h, torch.ones_like(best[0]), opts.bits, opts.group) for w in weights)
    return best[0], best[1], best[2], base


def _rescale_stats(node: fx.Node, s: torch.Tensor) -> None:
    st = dict(node.meta.get(ir.ACT_STATS) or {})
    sd = s.double()
    if st.get("hdiag") is not None:
        st["hdiag"] = st["hdiag"] / sd.pow(2)
    if st.get("H") is not None:
        st["H"] = st["H"] / (sd[:, None] * sd[None, :])
    if st.get("channel_absmax") is not None:
        st["channel_absmax"] = st["channel_absmax"] / s.to(st["channel_absmax"].dtype)
    node.meta[ir.ACT_STATS] = st


def _replace_attr(gm: fx.GraphModule, user: fx.Node, index: int, value: torch.Tensor, why: str) -> None:
    """Point argument `index` of `user` at a new buffer holding `value` (the old tensor is left alone)."""
    old = user.args[index]
    module = ir.module_of(old) if isinstance(old, fx.Node) else ir.module_of(user)
    target = set_constant(gm, "", f"{old.target.replace('.', '_')}_awq", value)
    node = insert_get_attr(gm, user, target, module)
    node.meta[ir.SHAPE] = tuple(value.shape)
    args = list(user.args)
    args[index] = node
    user.args = tuple(args)
    ir.add_provenance(user, PASS, why)


@register_pass(PASS, options=AwqScaleOptions, kind="transform", requires=(CalibrationData,),
               preserves=(CalibrationData,))  # the statistics and samples of scaled linears are rescaled here
def awq_scale(gm: fx.GraphModule, ctx) -> PassResult:
    """Fold activation-aware input-channel scales into LayerNorm-fed linears (see module docstring)."""
    opts = ctx.options or AwqScaleOptions()
    scaled, gains = 0, []
    for ln in list(gm.graph.nodes):
        if ln.op != "call_function" or ln.target is not LAYER_NORM or len(ln.args) < 4:
            continue
        users = _linear_users(gm, ln)
        if users is None or any(_shared(gm, u) for u in users):
            continue
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in ln.args[2:4]):
            continue
        k = ir.node_weight(gm, users[0]).shape[1]
        if k > opts.max_k:
            continue
        found = _search(gm, users, opts)
        if found is None or found[2] == 0.0:
            continue
        s, err, alpha, base = found
        ratio = err / max(base, 1e-30)
        why = f"input channels scaled by E[x^2]^({alpha:g}/2): {opts.bits}-bit error {ratio:.2f}x"
        for i in (2, 3):
            _replace_attr(gm, ln, i, ir.get_attr_value(gm, ln.args[i].target).detach().float() / s, why)
        samples = ctx.analyses.get(CalibrationData, needed_by=PASS).samples
        for u in users:
            _replace_attr(gm, u, 1, ir.node_weight(gm, u).detach().float() * s, why)
            _rescale_stats(u, s)
            if isinstance(samples.get(u.name), torch.Tensor) and samples[u.name].shape[-1] == s.numel():
                samples[u.name] = samples[u.name] / s
        scaled += 1
        gains.append(err / max(base, 1e-30))
    remove_dead_nodes(gm, PASS)  # the replaced weight reads
    gm.graph.lint()
    gm.recompile()
    mean = sum(gains) / len(gains) if gains else 1.0
    return PassResult(
        changed=scaled > 0,
        message=f"{scaled} LayerNorm groups scaled; nominal {opts.bits}-bit error x{mean:.2f} on average",
    )
