"""Lowered-op construction shared by passes: `make_op` (decision + QuantizedWeight -> op module),
`quantize_node` (a decided node's QuantizedWeight) and the static-activation-scale ops. Passes share
code only through the core, so `quantize` (its SQNR check) and `lower` both build ops here.

Example:
    >>> op = make_op(gm, node, qw)        # doctest: +SKIP
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.errors import ConfigError
from fxquant.graphutil import conv_output_size
from fxquant.quant_cache import QuantCache
from fxquant.ops import LowbitConv, LowbitLinear, apply_epilogue
from fxquant.qweight import QuantizedWeight, group_accumulators
from fxquant.quantizers import nodes as qn

__all__ = [
    "make_op",
    "quant_args",
    "quantize_node",
    "static_linear",
    "StaticLowbitLinear",
    "StaticLowbitConv",
]

GPTQ_MIN_ROWS_PER_INPUT = 2     # rounding='gptq' needs calibration rows >= this * K, else nearest



def static_linear(x: torch.Tensor, qw: QuantizedWeight, bias, act_scale: torch.Tensor) -> torch.Tensor:
    """Like qweight.reference_linear but with one calibrated activation scale for every row."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()
    s = act_scale.float()
    xq = torch.clamp(torch.round(x2 / s), -127, 127).to(torch.int8)
    y = (group_accumulators(xq, qw).float() * qw.scales[None]).sum(-1) * s
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, qw.codes.shape[0])


class _StaticForward:
    """forward for static-scale ops: a kernel only when it implements the static activation scale."""

    def forward(self, x):
        if self.kernel is not None and getattr(self.kernel, "supports_static_act", False):
            return self.kernel(x)
        return self.reference(x)


class StaticLowbitLinear(_StaticForward, LowbitLinear):
    """LowbitLinear with a static (calibrated, per-tensor) int8 activation scale."""

    def __init__(self, qw, bias, act_scale: float, epilogue=None):
        super().__init__(qw, bias, 8, epilogue)
        self.act_mode = "static"
        self.register_buffer("act_scale", torch.tensor(float(act_scale)))

    def reference(self, x):
        return apply_epilogue(static_linear(x, self.qweight, self.bias, self.act_scale), self.epilogue).to(
            x.dtype
        )


class StaticLowbitConv(_StaticForward, LowbitConv):
    """LowbitConv (groups == 1) with a static int8 activation scale on the im2col rows."""

    def __init__(
        self, qw, bias, weight_shape, stride, padding, dilation, groups, act_scale: float, epilogue=None
    ):
        super().__init__(qw, bias, weight_shape, stride, padding, dilation, groups, 8, epilogue)
        self.act_mode = "static"
        self.register_buffer("act_scale", torch.tensor(float(act_scale)))

    def reference(self, x):
        if self.groups != 1:
            return super().reference(x)
        kernel = self.weight_shape[2:]
        rows = qn.conv_rows(x, kernel, self.stride, self.padding, self.dilation, 1)
        y = static_linear(rows, self.qweight, self.bias, self.act_scale)  # [N*L, Cout]
        shape = [
            conv_output_size(size, k, s, p, d)
            for size, k, s, p, d in zip(x.shape[2:], kernel, self.stride, self.padding, self.dilation)
        ]
        y = y.view(x.shape[0], -1, y.shape[-1]).transpose(1, 2).reshape(x.shape[0], -1, *shape)
        return apply_epilogue(y, self.epilogue).to(x.dtype)


def make_op(
    gm: fx.GraphModule, node: fx.Node, qw: QuantizedWeight, epilogue: str | None = None
) -> torch.nn.Module:
    """The lowered module for a node given its QuantizedWeight and decision."""
    d: ir.QuantDecision = node.meta[ir.DECISION]
    b = qn.bias_of(node)
    bias = ir.get_attr_value(gm, b.target) if isinstance(b, fx.Node) and b.op == "get_attr" else None
    if isinstance(b, fx.Node) and b.op != "get_attr":
        raise ConfigError(
            f"{qn.describe(node)}: the bias is computed in the graph ({b.name}); lowering needs a "
            f"constant bias (run const-fold first) or keep the node float with a rule"
        )
    static = d.act_mode == "static" and d.act_bits == 8
    scale = None
    if static:
        stats = node.meta.get(ir.ACT_STATS)
        if not stats:
            raise ConfigError(
                f"{qn.describe(node)}: act_mode='static' needs calibrated activation ranges; run "
                f"the calibrate pass before lower"
            )
        scale = max(stats["absmax"], 1e-12) / 127.0
    if node.target in ir.LINEAR_TARGETS:
        if static:
            return StaticLowbitLinear(qw, bias, scale, epilogue)
        return LowbitLinear(qw, bias, d.act_bits, epilogue)
    w = ir.node_weight(gm, node)
    stride, padding, dilation, groups = qn.conv_args(node)
    args = (qw, bias, tuple(w.shape), list(stride), list(padding), list(dilation), groups)
    if static and groups == 1:
        return StaticLowbitConv(*args, scale, epilogue)
    return LowbitConv(*args, d.act_bits, epilogue)


def quant_args(gm: fx.GraphModule, node: fx.Node) -> tuple[dict, str | None]:
    """(keyword arguments of quantize_weight for a decided node, provenance note or None)."""
    d: ir.QuantDecision = node.meta[ir.DECISION]
    stats = node.meta.get(ir.ACT_STATS) or {}
    hessian = stats.get("H") if d.rounding == "gptq" else None
    rounding, note = d.rounding, None
    if rounding == "gptq" and hessian is None:
        rounding = "nearest"
        why = (
            "no calibration H (run calibrate)"
            if not stats
            else "H not collected (grouped conv or K too large)"
        )
        note = f"gptq -> nearest rounding: {why}"
    elif rounding == "gptq" and stats.get("rows", 0) < GPTQ_MIN_ROWS_PER_INPUT * hessian.shape[0]:
        # With fewer rows than input channels H is singular: GPTQ then moves the rounding error into
        # directions calibration never saw (measured: Whisper tiny.en avg 3 bits, decoder calibrated on ~200
        # tokens for K = 384: WER 88.4 % with GPTQ on every layer, 22.7 % with this fallback, 60 LJ clips).
        rows, k, need = stats.get("rows", 0), hessian.shape[0], GPTQ_MIN_ROWS_PER_INPUT
        rounding, hessian = "nearest", None
        note = (f"gptq -> nearest rounding: {rows} calibration rows for K={k} input channels "
                f"(GPTQ needs >= {need}K; add calibration data)")
        warnings.warn(f"gptq: too few calibration rows for some layers, which fall back to nearest "
                      f"rounding (see the report's provenance); add calibration data (>= {need} rows per "
                      f"input channel)", stacklevel=2)
    args = dict(
        weight=ir.node_weight(gm, node),
        bits=d.weight_bits,
        scheme=d.scheme,
        granularity=d.granularity,
        group_size=d.group_size,
        symmetric=d.symmetric,
        hdiag=stats.get("hdiag"),
        hessian=hessian,
        rounding=rounding,
        where=qn.describe(node),
    )
    return args, note


def quantize_node(gm: fx.GraphModule, node: fx.Node, cache: QuantCache | None = None) -> QuantizedWeight:
    """QuantizedWeight of one decided node (uses meta ACT_STATS when present)."""
    args, note = quant_args(gm, node)
    if note:
        ir.add_provenance(node, "quantize", note)
    return (cache or QuantCache(max_bytes=0)).quantize(**args)
