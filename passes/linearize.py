"""linearize: rewrite matmul/mm/addmm with a constant 2-D weight into aten.linear, so it can be quantized.

    matmul(x, t(W))            -> linear(x, W)          (tied output projections, e.g. Whisper's logits)
    addmm(b, x, t(W))          -> linear(x, W, b)
    matmul(x, W)  W: [K, N]    -> linear(x, W^T)        (only when nothing else reads W; W^T replaces it)

The new node's module is the weight's owner when the call had none (e.g. "decoder.token_embedding").

Example:
    cleanup,const-fold,linearize,propagate-shapes
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.graphutil import drop_unused_attributes, insert_get_attr, remove_dead_nodes, set_constant
from fxquant.registry import PassResult, register_pass

aten = torch.ops.aten
MATMULS = {aten.matmul.default, aten.mm.default}


def _transposed_weight(node) -> fx.Node | None:
    """W when node is t(W) / transpose(W, 0, 1) / permute(W, [1, 0]) of a 2-D get_attr."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node) or src.op != "get_attr":
        return None
    t = node.target
    if (
        t is aten.t.default
        or (t is aten.transpose.int and sorted(node.args[1:3]) in ([0, 1], [-2, -1], [-1, 0]))
        or (t is aten.permute.default and list(node.args[1]) == [1, 0])
    ):
        return src
    return None


def _owner(weight: fx.Node) -> str:
    return weight.target.rsplit(".", 1)[0] if "." in weight.target else ""


def _replace(gm, node, x, weight, bias, how: str) -> None:
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(
            aten.linear.default, (x, weight, bias) if bias is not None else (x, weight)
        )
    ir.copy_meta(node, new)
    if not new.meta.get(ir.MODULE):
        new.meta[ir.MODULE] = _owner(weight)
        new.meta[ir.MODULE_TYPE] = "Linear"
    new.meta["val"] = node.meta.get("val")
    ir.add_provenance(new, "linearize", f"{node.name} ({how}) rewritten as linear")
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


@register_pass("linearize", kind="transform")
def linearize(gm, ctx) -> PassResult:
    """Turn matmuls with constant weights into aten.linear nodes."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in MATMULS and len(node.args) == 2:
            x, w = node.args
            weight = _transposed_weight(w)
            if weight is not None and ir.get_attr_value(gm, weight.target).dim() == 2:
                _replace(gm, node, x, weight, None, "x @ W.T")
                done += 1
            elif (
                isinstance(w, fx.Node)
                and w.op == "get_attr"
                and len(w.users) == 1
                and ir.get_attr_value(gm, w.target).dim() == 2
            ):
                value = ir.get_attr_value(gm, w.target)
                new_w = insert_get_attr(
                    gm,
                    node,
                    set_constant(gm, _owner(w), w.target.rsplit(".", 1)[-1] + "_t", value.t().contiguous()),
                    _owner(w),
                )
                _replace(gm, node, x, new_w, None, "x @ W")
                done += 1
        elif node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
            bias, x, w = node.args
            weight = _transposed_weight(w)
            if weight is not None and isinstance(bias, fx.Node) and bias.op == "get_attr":
                _replace(gm, node, x, weight, bias, "addmm")
                done += 1
    if done:
        remove_dead_nodes(gm, "linearize")
        drop_unused_attributes(gm)
    return PassResult(changed=done > 0, message=f"{done} matmuls rewritten as linear")
