"""fuse-residual (transform): `x + linear(h)` becomes one kernel call that adds x to its output rows.

Residual blocks end in `x + out_proj(...)` / `x + fc2(...)`. When one operand of an `aten.add.Tensor`
(alpha 1, no broadcasting) is a plain `LowbitLinear` call whose only user is that add, the op gets
`residual = True` and the other operand as its second input; the C kernel adds it after bias and
epilogue while the output rows are still in cache, and the add node disappears.

Example:
    ...,lower,merge-siblings,fuse-layernorm,fuse-residual,lower-attention,codegen
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.ops import LowbitLinear
from fxquant.registry import PassResult, register_pass

PASS = "fuse-residual"
ADD = torch.ops.aten.add.Tensor


def _fusable_linear(gm: fx.GraphModule, node) -> bool:
    if not (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and len(node.users) == 1
        and len(node.args) == 1
    ):
        return False
    mod = gm.get_submodule(node.target)
    return type(mod) is LowbitLinear and not mod.residual and mod.act_bits in (8, None)


def _same_shape(a: fx.Node, b: fx.Node, add: fx.Node) -> bool:
    shapes = [n.meta.get(ir.SHAPE) for n in (a, b, add)]
    if shapes[0] is None or not shapes[0] == shapes[1] == shapes[2]:
        return False
    vb, vadd = b.meta.get("val"), add.meta.get("val")
    if isinstance(vb, torch.Tensor) and isinstance(vadd, torch.Tensor):
        return vb.dtype == torch.float32 and tuple(vb.shape) == tuple(vadd.shape)  # symbolic sizes too
    return True


@register_pass(PASS, kind="transform")
def fuse_residual(gm: fx.GraphModule, ctx) -> PassResult:
    """Fold residual adds into the LowbitLinear kernel that produces one of their operands."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not ADD or len(node.args) != 2 or node.kwargs:
            continue
        for lin, other in ((node.args[1], node.args[0]), (node.args[0], node.args[1])):
            if not (
                _fusable_linear(gm, lin)
                and isinstance(other, fx.Node)
                and order[other] < order[lin]
                and _same_shape(lin, other, node)
            ):
                continue
            gm.get_submodule(lin.target).residual = True
            lin.args = (lin.args[0], other)
            ir.add_provenance(lin, PASS, f"adds {other.name} to its output (was {node.name})")
            node.replace_all_uses_with(lin)
            gm.graph.erase_node(node)
            fused += 1
            break
    gm.recompile()
    return PassResult(changed=fused > 0, message=f"{fused} residual adds fused into linear kernels")
