"""cleanup: remove dropout, identity ops, no-op arithmetic/reshapes, and dead nodes.

Example:
    cleanup                      # everything
    cleanup{dead_code=false}     # keep unused nodes
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxquant.graphutil import remove_dead_nodes, replace_node
from fxquant.registry import PassResult, register_pass

aten = torch.ops.aten
DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
            aten.feature_alpha_dropout.default}
IDENTITIES = {aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}
NEUTRAL_SCALAR = {aten.mul.Tensor: 1, aten.div.Tensor: 1, aten.add.Tensor: 0, aten.sub.Tensor: 0,
                  aten.mul.Scalar: 1, aten.div.Scalar: 1, aten.add.Scalar: 0, aten.sub.Scalar: 0}
SHAPE_OPS = {aten.view.default, aten.reshape.default, aten.expand.default, aten._unsafe_view.default,
             aten.slice.Tensor}  # a slice that keeps the shape is the identity


@dataclass
class CleanupOptions:
    dropout: bool = True
    identity: bool = True
    noop: bool = True
    dead_code: bool = True


def _same_shape(node) -> bool:
    """Static shape equality between a node and its first input, from export's 'val' meta."""
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    # symbolic sizes compare by their symbol (s0 == s0); nothing is evaluated or guarded
    return src.dtype == out.dtype and [str(d) for d in src.shape] == [str(d) for d in out.shape]


def _noop_reason(node, opts: CleanupOptions) -> str | None:
    t = node.target
    if opts.dropout and t in DROPOUTS:
        return "was dropout (inference)"
    if opts.identity and t in IDENTITIES and not node.kwargs.get("memory_format"):
        return f"was identity {t.__name__}"
    if not opts.noop:
        return None
    if t in NEUTRAL_SCALAR and len(node.args) == 2 and not isinstance(node.args[1], torch.fx.Node) \
            and node.args[1] == NEUTRAL_SCALAR[t] and node.kwargs.get("alpha", 1) == 1 and _same_shape(node):
        return f"was {t.__name__} by {node.args[1]}"
    if t in SHAPE_OPS and _same_shape(node):
        return f"was a no-op {t.__name__}"
    if t in (aten.to.dtype, aten._to_copy.default) and _same_shape(node) and len(node.kwargs) <= 1 \
            and set(node.kwargs) <= {"dtype"}:
        return "was a same-dtype conversion"
    return None


@register_pass("cleanup", options=CleanupOptions, kind="transform")
def cleanup(gm, ctx) -> PassResult:
    """Remove dropout, identities, no-op ops and dead nodes."""
    opts: CleanupOptions = ctx.options
    removed: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        why = _noop_reason(node, opts)
        if why:
            replace_node(node, node.args[0], "cleanup", f"removed ({why})")
            kind = why.split(" ")[1] if why.startswith("was ") else why
            removed[kind] = removed.get(kind, 0) + 1
    dead = remove_dead_nodes(gm, "cleanup") if opts.dead_code else 0
    parts = [f"{v} {k}" for k, v in sorted(removed.items())] + ([f"{dead} dead"] if dead else [])
    return PassResult(changed=bool(removed or dead), message="removed " + (", ".join(parts) or "nothing"))
