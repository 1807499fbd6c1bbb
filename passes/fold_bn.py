"""fold-bn: fold inference BatchNorm1d/2d into the preceding conv1d/conv2d/linear.

For y = BN(conv(x)) with scale a = gamma / sqrt(var + eps):
    W' = W * a (per output channel; grouped and depthwise convs included)
    b' = (b - mean) * a + beta
A BatchNorm that cannot be folded stays in place and its node's provenance records why
(input is not a conv/linear, the conv output has other users, a linear whose output rank is not 2, ...).

Example:
    fold-bn
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.graphutil import drop_unused_attributes, insert_get_attr, remove_dead_nodes, set_constant
from fxquant.registry import PassResult, register_pass

aten = torch.ops.aten
BN_TARGETS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
FOLDABLE = ir.LINEAR_TARGETS + ir.CONV_TARGETS


def _bn_parts(bn: fx.Node):
    """(input, weight, bias, mean, var, eps, training) of either BatchNorm form."""
    a = bn.args
    if bn.target is aten.batch_norm.default:
        return a[0], a[1], a[2], a[3], a[4], a[7], a[5]
    return a[0], a[1], a[2], a[3], a[4], a[6], False


def _const(gm, node):
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return ir.get_attr_value(gm, node.target).detach()
    raise ValueError("not a constant")


def _why_not(gm, bn: fx.Node) -> str | None:
    src, w, b, mean, var, _eps, training = _bn_parts(bn)
    if training:
        return "batch_norm runs in training mode"
    if not isinstance(src, fx.Node) or src.op != "call_function" or src.target not in FOLDABLE:
        name = src.target.__name__ if isinstance(src, fx.Node) and callable(src.target) else str(src)
        return f"its input is {name}, not a conv1d/conv2d/linear"
    if len(src.users) != 1:
        return f"{src.name} has {len(src.users)} users, folding would change the others"
    if not ir.is_quantizable(src) or (len(src.args) > 2 and src.args[2] is not None
                                      and getattr(src.args[2], "op", None) != "get_attr"):
        return f"{src.name}'s weight/bias are not constant parameters"
    if any(p is not None and (not isinstance(p, fx.Node) or p.op != "get_attr") for p in (w, b, mean, var)):
        return "BatchNorm statistics are not constant buffers"
    if src.target in ir.LINEAR_TARGETS:
        val = src.meta.get("val")
        if val is None or val.dim() != 2:
            return "linear output is not 2-D, so BatchNorm1d normalises a different axis"
    if bn.target is aten._native_batch_norm_legit_no_training.default:
        if any(u.target is not __import__("operator").getitem or u.args[1] != 0 for u in bn.users):
            return "BatchNorm's saved statistics are used"
    return None


def _fold(gm, bn: fx.Node) -> None:
    src, w_n, b_n, mean_n, var_n, eps, _ = _bn_parts(bn)
    weight = ir.node_weight(gm, src)
    bias_node = src.args[2] if len(src.args) > 2 else None
    bias = _const(gm, bias_node) if bias_node is not None else torch.zeros(weight.shape[0])
    mean, var = _const(gm, mean_n).double(), _const(gm, var_n).double()
    gamma = _const(gm, w_n).double() if w_n is not None else torch.ones_like(mean)
    beta = _const(gm, b_n).double() if b_n is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + eps)
    new_w = (weight.double() * scale.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    new_b = ((bias.double() - mean) * scale + beta).to(weight.dtype)
    module = src.meta.get(ir.MODULE, "")
    owner = src.args[1].target.rsplit(".", 1)[0] if "." in src.args[1].target else ""
    w_node = insert_get_attr(gm, src, set_constant(gm, owner, "weight_bn_folded", new_w), module)
    b_node = insert_get_attr(gm, src, set_constant(gm, owner, "bias_bn_folded", new_b), module)
    args = list(src.args)
    while len(args) < 3:
        args.append(None)
    args[1], args[2] = w_node, b_node
    src.args = tuple(args)
    ir.add_provenance(src, "fold-bn", f"folded {bn.name} ({bn.meta.get(ir.MODULE, '')}) into weight and bias")
    users = list(bn.users)
    if bn.target is aten._native_batch_norm_legit_no_training.default:
        for u in users:
            u.replace_all_uses_with(src)
            gm.graph.erase_node(u)
    else:
        bn.replace_all_uses_with(src)
    gm.graph.erase_node(bn)


@register_pass("fold-bn", kind="transform")
def fold_bn(gm, ctx) -> PassResult:
    """Fold BatchNorm into the preceding conv/linear; record why when it cannot."""
    folded, kept = 0, 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in BN_TARGETS:
            continue
        reason = _why_not(gm, node)
        if reason is None:
            _fold(gm, node)
            folded += 1
        else:
            ir.add_provenance(node, "fold-bn", f"not folded: {reason}")
            kept += 1
    if folded:
        remove_dead_nodes(gm, "fold-bn")
        drop_unused_attributes(gm)
    return PassResult(changed=folded > 0, message=f"folded {folded} BatchNorm, left {kept}")
