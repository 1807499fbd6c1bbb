"""Small graph-editing helpers shared by passes (a core leaf: imports only fxquant.ir).

Example:
    >>> import torch, fxquant
    >>> gm = fxquant.capture(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    >>> remove_dead_nodes(gm, "cleanup")
    0
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx import _pytree as fx_pytree

from . import ir

_SIDE_EFFECT_TAGS = {getattr(torch.Tag, "nondeterministic_seeded", None)}


aten = torch.ops.aten
# layout-only ops: views of their first argument at run time (reshape may copy, but never writes its input)
LAYOUT_OPS = frozenset({aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default,
                        aten.reshape.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
                        aten.squeeze.default, aten.slice.Tensor, aten.select.int, aten.alias.default,
                        aten.detach.default, aten._unsafe_view.default})


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution along one axis, as torch computes it (below 1: input too short).

    Example:
        >>> conv_output_size(3000, 3, stride=2, padding=1)   # Whisper's conv2 over 30 s of mel frames
        1500
        >>> conv_output_size(10, 3, dilation=2), conv_output_size(2, 5, padding=1)
        (6, 0)
    """
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def is_pure(node: fx.Node) -> bool:
    """True when removing or evaluating the node early cannot change behaviour."""
    if node.op == "get_attr":
        return True
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema
        if schema.is_mutable or any(t in _SIDE_EFFECT_TAGS for t in node.target.tags):
            return False
        return True
    return False


def replace_node(node: fx.Node, replacement: Any, pass_name: str, why: str) -> None:
    """Route every use of `node` to `replacement`, note it on the users, erase `node`.

    Notes the erased node had received about its own removed inputs move on to its users.
    """
    inherited = [p for p in node.meta.get(ir.PROVENANCE, ()) if p.startswith(f"{pass_name}: input ")]
    for user in list(node.users):
        for note in inherited:
            user.meta[ir.PROVENANCE] = tuple(user.meta.get(ir.PROVENANCE, ())) + (note,)
        ir.add_provenance(user, pass_name, f"input {node.name} {why}")
    node.replace_all_uses_with(replacement)
    node.graph.erase_node(node)


def fresh_submodule_name(gm: torch.nn.Module, base: str) -> str:
    """`base` with dots as underscores, suffixed _1, _2, ... until no attribute of gm has the name."""
    base = base.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def remove_dead_nodes(gm: fx.GraphModule, pass_name: str) -> int:
    """Erase pure nodes (and get_attr reads) whose results nobody uses; returns how many."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and is_pure(node):
            gm.graph.erase_node(node)
            removed += 1
    return removed


def flat_inputs(gm: fx.GraphModule, args: tuple) -> list:
    """The placeholder values of a captured graph for positional `args`."""
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return list(args)
    return fx_pytree.tree_flatten_spec((list(args), {}), spec)


def set_constant(gm: fx.GraphModule, module_path: str, name: str, value: torch.Tensor) -> str:
    """Register `value` as a buffer on the submodule at module_path (root when ''); returns the target.

    New names never overwrite the model's own tensors (which the user's model may share).
    """
    owner = gm.get_submodule(module_path) if module_path else gm
    base, i = name, 0
    while hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    owner.register_buffer(name, value.detach().clone(), persistent=True)
    return f"{module_path}.{name}" if module_path else name


def insert_get_attr(gm: fx.GraphModule, before: fx.Node, target: str, module: str) -> fx.Node:
    """A get_attr node for `target` placed before `before`, with IR meta filled in."""
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta[ir.MODULE] = module
    node.meta[ir.PROVENANCE] = ()
    return node


def drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete buffers/params that no get_attr node reads anymore (frees folded-away weights)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()) + list(gm.named_parameters()):
        if name not in used:
            path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(path) if path else gm
            if attr in owner._buffers:
                del owner._buffers[attr]
            elif attr in owner._parameters:
                del owner._parameters[attr]
