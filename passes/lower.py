"""lower (transform): replace decided aten.linear / conv nodes by calls to LowbitLinear / LowbitConv.

For every quantizable node whose decision is not float: a new submodule named after the module
path ("encoder.blocks.0.mlp.0" -> "encoder_blocks_0_mlp_0", suffixed _1, _2 on clashes) holding
ctx.state["qweights"][node.name] (computed by quantize; computed here when missing), then:
- a following relu / gelu (exact) / silu that is the node's only user is fused as the epilogue;
- weight / bias get_attrs left without users are erased and the fp32 tensors deleted from the module;
- decision.act_mode == "static" uses StaticLowbitLinear / StaticLowbitConv (fixed input scale
  absmax / 127 from calibration; see below); meta is copied and provenance added.
Option io_qdq=True also inserts explicit int8 quantize -> dequantize nodes (`quantize_int8`,
`dequantize_int8`, per-tensor scale = calibrated absmax / 127) after every float graph input and
before every graph output.

Static ops: fxquant.ops has only the dynamic per-row semantics, so this module subclasses them.
They set `act_mode = "static"` and `act_scale` (buffer); a kernel attached by codegen is used only
when it declares `supports_static_act = True`, else the reference path runs.

Example:
    >>> import torch, fxquant.tracing as c
    >>> from fxquant.registry import PassContext
    >>> gm = c.capture(torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU()), (torch.randn(2, 64),))
    >>> from passes.assign_precision import assign_precision                # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.errors import ConfigError
from fxquant.graphutil import fresh_submodule_name
from fxquant.ops import LowbitConv, LowbitLinear, apply_epilogue
from fxquant.qweight import QuantizedWeight, group_accumulators
from fxquant.quantizers import nodes as qn
from fxquant.registry import PassResult, register_pass

PASS = "lower"
aten = torch.ops.aten
EPILOGUE_TARGETS = {aten.relu.default: "relu", aten.silu.default: "silu", aten.gelu.default: "gelu"}


@dataclass
class LowerOptions:
    io_qdq: bool = False      # insert int8 quantize/dequantize nodes at graph inputs and outputs


def quantize_int8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-tensor symmetric int8: clamp(round(x / scale), -127, 127)."""
    return torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8)


def dequantize_int8(q: torch.Tensor, scale: float) -> torch.Tensor:
    return q.float() * scale


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
        return apply_epilogue(static_linear(x, self.qweight, self.bias, self.act_scale), self.epilogue).to(x.dtype)


class StaticLowbitConv(_StaticForward, LowbitConv):
    """LowbitConv (groups == 1) with a static int8 activation scale on the im2col rows."""

    def __init__(self, qw, bias, weight_shape, stride, padding, dilation, groups, act_scale: float, epilogue=None):
        super().__init__(qw, bias, weight_shape, stride, padding, dilation, groups, 8, epilogue)
        self.act_mode = "static"
        self.register_buffer("act_scale", torch.tensor(float(act_scale)))

    def reference(self, x):
        if self.groups != 1:
            return super().reference(x)
        kernel = self.weight_shape[2:]
        rows = qn.conv_rows(x, kernel, self.stride, self.padding, self.dilation, 1)
        y = static_linear(rows, self.qweight, self.bias, self.act_scale)            # [N*L, Cout]
        shape = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
                 zip(x.shape[2:], kernel, self.stride, self.padding, self.dilation)]
        y = y.view(x.shape[0], -1, y.shape[-1]).transpose(1, 2).reshape(x.shape[0], -1, *shape)
        return apply_epilogue(y, self.epilogue).to(x.dtype)


def make_op(gm: fx.GraphModule, node: fx.Node, qw: QuantizedWeight, epilogue: str | None = None) -> torch.nn.Module:
    """The lowered module for a node given its QuantizedWeight and decision."""
    d: ir.QuantDecision = node.meta[ir.DECISION]
    b = qn.bias_of(node)
    bias = ir.get_attr_value(gm, b.target) if isinstance(b, fx.Node) and b.op == "get_attr" else None
    if isinstance(b, fx.Node) and b.op != "get_attr":
        raise ConfigError(f"{qn.describe(node)}: the bias is computed in the graph ({b.name}); lowering needs a "
                          f"constant bias (run const-fold first) or keep the node float with a rule")
    static = d.act_mode == "static" and d.act_bits == 8
    scale = None
    if static:
        stats = node.meta.get(ir.ACT_STATS)
        if not stats:
            raise ConfigError(f"{qn.describe(node)}: act_mode='static' needs calibrated activation ranges; run "
                              f"the calibrate pass before lower")
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


def _submodule_name(gm: fx.GraphModule, node: fx.Node) -> str:
    return fresh_submodule_name(gm, ir.module_of(node) or node.name)


def _drop_attr(gm: fx.GraphModule, node: fx.Node) -> None:
    if node.op != "get_attr" or node.users:
        return
    target = str(node.target)
    gm.graph.erase_node(node)
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if hasattr(owner, attr):
        delattr(owner, attr)


def _insert_qdq(gm: fx.GraphModule, ctx) -> int:
    stats = ctx.state.get("io_stats") or {}
    count = 0
    graph = gm.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    targets = [(n, n.name) for n in graph.nodes if n.op == "placeholder"]
    targets += [(n, f"output:{i}") for i, n in enumerate(out_node.all_input_nodes)]
    for src, key in targets:
        if key not in stats:
            continue
        scale = max(stats[key]["absmax"], 1e-12) / 127.0
        with graph.inserting_after(src):
            q = graph.call_function(quantize_int8, (src, scale))
        with graph.inserting_after(q):
            dq = graph.call_function(dequantize_int8, (q, scale))
        if src.op == "placeholder":
            src.replace_all_uses_with(dq, delete_user_cb=lambda u: u is not q and u.target != "_guards_fn")
        else:
            out_node.replace_input_with(src, dq)
        for n in (q, dq):
            n.meta[ir.MODULE] = ir.module_of(src) if src.op != "placeholder" else ""
            ir.add_provenance(n, PASS, f"io q/dq of {src.name} (scale {scale:.3g})")
        count += 1
    return count


@register_pass(PASS, options=LowerOptions, kind="transform")
def lower(gm: fx.GraphModule, ctx) -> PassResult:
    """Rewrite decided linear/conv nodes into LowbitLinear / LowbitConv submodules."""
    opts = ctx.options or LowerOptions()
    qweights = ctx.state.setdefault("qweights", {})
    lowered, fused = 0, 0
    for node in list(gm.graph.nodes):
        d = node.meta.get(ir.DECISION)
        if not ir.is_quantizable(node) or d is None or d.weight_bits is None:
            continue
        if node.name not in qweights:
            from .quantize import quantize_node
            qweights[node.name] = quantize_node(gm, node)
        epi_node = None
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target in EPILOGUE_TARGETS:
            u = users[0]
            if u.target != aten.gelu.default or u.kwargs.get("approximate", "none") == "none" and len(u.args) == 1:
                epi_node = u
        epilogue = EPILOGUE_TARGETS[epi_node.target] if epi_node is not None else None
        op = make_op(gm, node, qweights[node.name], epilogue)
        name = _submodule_name(gm, node)
        gm.add_submodule(name, op)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],))
        ir.copy_meta(node, new)
        last = epi_node or node
        last.replace_all_uses_with(new)
        msg = f"{d.label()} -> {type(op).__name__} {name}" + (f" + {epilogue} epilogue" if epilogue else "")
        ir.add_provenance(new, PASS, msg)
        weight_node, bias_node = node.args[1], qn.bias_of(node)
        if epi_node is not None:
            gm.graph.erase_node(epi_node)
            fused += 1
        gm.graph.erase_node(node)
        _drop_attr(gm, weight_node)
        if isinstance(bias_node, fx.Node):
            _drop_attr(gm, bias_node)
        lowered += 1
    qdq = _insert_qdq(gm, ctx) if opts.io_qdq else 0
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return PassResult(changed=bool(lowered or qdq), message=f"{lowered} nodes lowered, {fused} epilogues fused"
                                                            + (f", {qdq} io q/dq pairs" if qdq else ""))
