"""fuse-layernorm (transform): a LayerNorm feeding only lowered linears becomes their kernels' prologue.

Transformer blocks normalise before every projection (attn_ln -> q/k/v, mlp_ln -> fc1, the final ln ->
logits). When every user of an `aten.layer_norm` over the last dim is a plain `LowbitLinear` taking it
as input, each of them gets the norm's weight, bias and eps (`LowbitLinear.fuse_layer_norm`) and reads
the un-normalised input; the C kernel normalises each row (in float64, rounded to float32 once) right
before quantizing it, so the normalised tensor is never written to memory and one op call disappears.
Norms with another kind of user stay, with the reason in provenance.

Example:
    ...,lower,merge-siblings,fuse-layernorm,fuse-residual,lower-attention,codegen
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.graphutil import remove_dead_nodes
from fxquant.ops import LowbitLinear
from fxquant.registry import PassResult, register_pass

PASS = "fuse-layernorm"
LAYER_NORM = torch.ops.aten.layer_norm.default


def _const(gm: fx.GraphModule, node) -> torch.Tensor | None | bool:
    """The tensor of a get_attr argument, None for None, False for anything computed at run time."""
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return ir.get_attr_value(gm, node.target)
    return False


def _why_not(gm: fx.GraphModule, node: fx.Node) -> str | None:
    shape = node.meta.get(ir.SHAPE)
    norm_shape = list(node.args[1])
    if not shape or norm_shape != list(shape[-1:]):
        return f"normalises over {norm_shape}, not the last dim of {shape}"
    for arg in node.args[2:4]:
        if _const(gm, arg) is False:
            return "weight/bias computed at run time"
    for user in node.users:
        mod = gm.get_submodule(user.target) if user.op == "call_module" else None
        if type(mod) is not LowbitLinear or user.args[0] is not node or mod.ln_eps is not None \
                or mod.act_bits not in (8, None) or any(a is node for a in user.args[1:]):
            return f"user {user.name} is not a plain lowered linear reading it as input"
    return None


@register_pass(PASS, kind="transform")
def fuse_layernorm(gm: fx.GraphModule, ctx) -> PassResult:
    """Move LayerNorms into the prologue of the LowbitLinear kernels that read them."""
    fused = kept = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not LAYER_NORM or not node.users:
            continue
        reason = _why_not(gm, node)
        if reason:
            ir.add_provenance(node, PASS, f"kept: {reason}")
            kept += 1
            continue
        weight, bias = _const(gm, node.args[2] if len(node.args) > 2 else None), \
            _const(gm, node.args[3] if len(node.args) > 3 else None)
        eps = node.args[4] if len(node.args) > 4 else 1e-5
        for user in list(node.users):
            gm.get_submodule(user.target).fuse_layer_norm(weight, bias, eps)
            user.args = (node.args[0],) + tuple(user.args[1:])
            ir.add_provenance(user, PASS, f"LayerNorm {node.name} (eps {eps}) fused as the kernel prologue")
        gm.graph.erase_node(node)
        fused += 1
    remove_dead_nodes(gm, PASS)  # the norms' weight/bias reads (in-place ops are never removed)
    gm.recompile()
    return PassResult(changed=fused > 0, message=f"{fused} LayerNorms fused into linear kernels"
                                                 + (f", {kept} kept (see provenance)" if kept else ""))
