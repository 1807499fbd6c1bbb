"""const-fold: evaluate nodes that depend only on parameters/buffers once, at compile time.

Folded results become buffers read by get_attr. Results larger than `max_growth` times their
inputs (expand/repeat of a table, say) are left alone, since folding them would cost memory, and so
are pure views of parameters (t, transpose, reshape...): they cost nothing at run time, and a folded
copy would duplicate the weight (the linearize pass turns matmul(x, W.t()) into linear(x, W) instead).

Example:
    const-fold{max_growth=1.0}
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.graphutil import (
    LAYOUT_OPS,
    drop_unused_attributes,
    insert_get_attr,
    is_pure,
    remove_dead_nodes,
    set_constant,
)
from fxquant.registry import PassResult, register_pass


aten = torch.ops.aten


@dataclass
class ConstFoldOptions:
    max_growth: float = 1.0


def _inputs_constant(node: fx.Node, values: dict) -> bool:
    return all(a in values for a in node.all_input_nodes) and bool(node.all_input_nodes)


@register_pass("const-fold", options=ConstFoldOptions, kind="transform")
def const_fold(gm, ctx) -> PassResult:
    """Replace parameter-only subexpressions by their precomputed value."""
    opts: ConstFoldOptions = ctx.options
    values: dict[fx.Node, object] = {}
    for node in gm.graph.nodes:  # evaluate every constant expression
        if node.op == "get_attr":
            values[node] = ir.get_attr_value(gm, node.target)
        elif node.op == "call_function" and is_pure(node) and _inputs_constant(node, values):
            args = fx.node.map_arg(node.args, lambda n: values[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
            with torch.no_grad():
                values[node] = node.target(*args, **kwargs)
    folded, skipped = 0, 0
    for node, result in list(values.items()):  # materialise only the frontier the runtime graph reads
        if (
            node.op == "get_attr"
            or not isinstance(result, torch.Tensor)
            or all(u in values for u in node.users)
        ):
            continue
        if node.target in LAYOUT_OPS:  # free at run time; materialising them would copy whole weights
            ir.add_provenance(
                node, "const-fold", "not folded: a free view of parameters (folding would copy them)"
            )
            continue
        in_numel = sum(v.numel() for n in node.all_input_nodes if isinstance(v := values[n], torch.Tensor))
        if result.numel() > opts.max_growth * max(in_numel, 1):
            ir.add_provenance(
                node,
                "const-fold",
                f"not folded: result has {result.numel()} elements, "
                f"inputs {in_numel} (max_growth={opts.max_growth})",
            )
            skipped += 1
            continue
        target = set_constant(gm, "", f"_fxq_const_{node.name}", result.contiguous())
        new = insert_get_attr(gm, node, target, node.meta.get(ir.MODULE, ""))
        for user in node.users:
            ir.add_provenance(user, "const-fold", f"input {node.name} folded into constant {target}")
        node.replace_all_uses_with(new)
        folded += 1
    if folded:
        remove_dead_nodes(gm, "const-fold")
        drop_unused_attributes(gm)
    return PassResult(
        changed=folded > 0,
        message=f"folded {folded} constant expressions" + (f", kept {skipped} large ones" if skipped else ""),
    )
