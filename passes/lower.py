"""lower (transform): replace decided aten.linear / conv nodes by calls to LowbitLinear / LowbitConv.

For every quantizable node whose decision is not float: a new submodule named after the module
path ("encoder.blocks.0.mlp.0" -> "encoder_blocks_0_mlp_0", suffixed _1, _2 on clashes) holding
the PackedWeights analysis's QuantizedWeight (quantize must run before: lower never quantizes), then:
- a following relu / gelu (exact) / silu that is the node's only user is fused as the epilogue;
- weight / bias get_attrs left without users are erased and the fp32 tensors deleted from the module;
- decision.act_mode == "static" uses StaticLowbitLinear / StaticLowbitConv (fixed input scale
  absmax / 127 from calibration; see below); meta is copied and provenance added;
- the calibrated second moments H ([K, K] float64, read only by quantize) are dropped from every
  node's ACT_STATS, so the compiled model does not carry 8*K^2 bytes per layer.
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
from fxquant.analysis import CalibrationData, PackedWeights
from fxquant.errors import ConfigError
from fxquant.graphutil import fresh_submodule_name
from fxquant.lowering import StaticLowbitConv, StaticLowbitLinear, make_op, static_linear  # noqa: F401
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


def _drop_second_moments(gm: fx.GraphModule) -> None:
    """Remove the [K, K] float64 second moments H from ACT_STATS: only quantize (gptq) reads them, and
    kept in the compiled model's meta they cost 8*K^2 bytes per layer (768 MiB for six 4096-wide layers)."""
    for node in gm.graph.nodes:
        stats = node.meta.get(ir.ACT_STATS)
        if isinstance(stats, dict) and stats.get("H") is not None:
            stats.pop("H")  # in place: erased nodes and copies of this meta share the dict


def _insert_qdq(gm: fx.GraphModule, ctx) -> int:
    stats = ctx.analyses.get(CalibrationData, needed_by="lower{io_qdq=true}").io_stats
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


@register_pass(PASS, options=LowerOptions, kind="transform", requires=(PackedWeights,))
def lower(gm: fx.GraphModule, ctx) -> PassResult:
    """Rewrite decided linear/conv nodes into LowbitLinear / LowbitConv submodules."""
    opts = ctx.options or LowerOptions()
    qweights = ctx.analyses.get(PackedWeights, needed_by=PASS).weights
    lowered, fused = 0, 0
    for node in list(gm.graph.nodes):
        d = node.meta.get(ir.DECISION)
        if not ir.is_quantizable(node) or d is None or d.weight_bits is None:
            continue
        if node.name not in qweights:
            raise ConfigError(
                f"lower: node {node.name!r} ({d.label()}) has no packed weight: its decision was "
                f"made after 'quantize' ran; run 'quantize' after the pass that changed decisions"
            )
        epi_node = None
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target in EPILOGUE_TARGETS:
            u = users[0]
            if (
                u.target != aten.gelu.default
                or u.kwargs.get("approximate", "none") == "none"
                and len(u.args) == 1
            ):
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
    _drop_second_moments(gm)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return PassResult(
        changed=bool(lowered or qdq),
        message=f"{lowered} nodes lowered, {fused} epilogues fused"
        + (f", {qdq} io q/dq pairs" if qdq else ""),
    )
