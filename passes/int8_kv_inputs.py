"""int8-kv-inputs (transform): an input read only as constant attention keys/values becomes an int8 input.

lower-attention gives a FusedAttention whose keys/values are views of an unmodified graph input (Whisper's
cross-attention cache) a per-row int8 copy, made on the first call and kept while the same tensor comes
back. The caller still holds the float32 input beside it: decoding 8 windows with Whisper tiny.en, a
147 MiB cache next to its 37 MiB int8 copy. This pass moves the conversion to the module's boundary. Such
an input is taken as the pair `fxquant.kv_rows.quantize_rows(x)` = (codes int8 [..., D], scales float32
[..., 1]), which a caller can fill window by window (fxquant.asr.decoding does), and the ops read codes
and scales through the same views. A float tensor is still accepted there: the compiled module converts
it once per tensor (fxquant.input_spec.InputSpec.adapt), so the module stays a drop-in replacement.

An input qualifies when it is a top-level argument of a torch.export capture and every use reaches an
int8-K/V FusedAttention's key or value through select / slice views that leave its last axis alone.
Anything else (a float K/V op, another use, a view over the last axis) keeps the input as it is, with
the reason in the pass message.

Example:
    ...,lower-attention,codegen,int8-kv-inputs
    # compiled Whisper step: step(tokens, quantize_rows(cross), self_kv, offset), or step(tokens, cross, ...)
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxquant import ir
from fxquant.graphutil import LAYOUT_OPS
from fxquant.ops import FusedAttention
from fxquant.registry import PassResult, register_pass

PASS = "int8-kv-inputs"
aten = torch.ops.aten
ROW_VIEWS = (aten.select.int, aten.slice.Tensor)   # views keeping whole rows when their axis is not the last
KEY, VALUE = 1, 2                  # in a FusedAttention call: (q, k, v, mask, key_scale, value_scale)


def _rank(node: fx.Node) -> int | None:
    shape = node.meta.get(ir.SHAPE)
    if shape is not None:
        return len(shape)
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def _reads_shape_only(user: fx.Node) -> bool:
    """torch.export's shape guards (the `_guards_fn` call) and size reads."""
    return (user.op == "call_module" and user.target == "_guards_fn") or \
        (user.op == "call_function" and user.target is aten.sym_size.int)


def _row_uses(gm: fx.GraphModule, root: fx.Node) -> tuple[list, list, str | None]:
    """(the row views under `root`, the (int8-K/V attention call, k/v position) pairs its views reach, why it
    cannot be taken as int8 rows or None). One walk through every view, so an input that attention reads but
    that does not qualify is told apart from one no attention reads."""
    rank = _rank(root)
    why = None if rank is not None else "its rank is unknown (run propagate-shapes)"
    views, ends, todo = [], [], [(root, rank or 1)]
    while todo:
        node, r = todo.pop()
        for user in node.users:
            if node is root and _reads_shape_only(user):
                continue                  # the codes have the input's shape: size reads and guards still hold
            if user.op == "call_function" and user.target in LAYOUT_OPS and user.args[0] is node:
                dim = user.args[1] if len(user.args) > 1 else 0
                if user.target not in ROW_VIEWS or user.kwargs or not isinstance(dim, int):
                    why = why or f"{user.name} is a {user.target.__name__} view, not a select / slice"
                elif dim % r == r - 1:
                    why = why or f"{user.name} views its last axis"
                else:
                    views.append(user)
                todo.append((user, r - 1 if user.target is aten.select.int else r))
                continue
            mod = gm.get_submodule(user.target) if user.op == "call_module" else None
            at = [i for i, a in enumerate(user.args) if a is node]
            scaled = [i for i in at if len(user.args) > i + 3 and user.args[i + 3] is not None]
            if not isinstance(mod, FusedAttention) or not mod.kv_int8 or not at or set(at) - {KEY, VALUE} \
                    or user.kwargs or scaled:
                why = why or f"{user.name} reads it other than as int8 attention keys/values"
            else:
                ends += [(user, i) for i in at]
    return views, ends, why


def _fake(node: fx.Node, make) -> None:
    """Set node's traced value to make(parent values), under the graph's fake mode (when it has one)."""
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return
    mode = getattr(vals[0], "fake_mode", None) if vals else None
    with mode if mode is not None else contextlib.nullcontext():
        node.meta["val"] = make(*vals)


def _fresh(name: str, taken: set) -> str:
    """`name`, or name_2, name_3, ... : the first that no input of the graph has."""
    out, i = name, 1
    while out in taken:
        i += 1
        out = f"{name}_{i}"
    taken.add(out)
    return out


def _split_input(gm: fx.GraphModule, root: fx.Node, views: list[fx.Node], ends) -> tuple[fx.Node, fx.Node]:
    """Replace `root` by placeholders (codes, scales); the views read codes, a copy of them reads scales."""
    graph, name = gm.graph, root.target
    taken = {n.target for n in graph.nodes if n.op == "placeholder"}
    with graph.inserting_before(root):
        codes = graph.placeholder(_fresh(f"{name}_int8", taken))
        scales = graph.placeholder(_fresh(f"{name}_scale", taken))
    val = root.meta.get("val")
    for node, dtype, last in ((codes, torch.int8, None), (scales, torch.float32, 1)):
        ir.copy_meta(root, node)
        shape = root.meta.get(ir.SHAPE)
        node.meta[ir.SHAPE] = None if shape is None else (*shape[:-1], last or shape[-1])
        node.meta[ir.DTYPE] = str(dtype).replace("torch.", "")
        node.meta[ir.INPUT_FORMAT] = "int8-rows" if last is None else "row-scales"
        if isinstance(val, torch.Tensor):
            mode = getattr(val, "fake_mode", None)
            with mode if mode is not None else contextlib.nullcontext():
                node.meta["val"] = val.new_empty((*val.shape[:-1], last or val.shape[-1]), dtype=dtype)
        what = f"int8 rows of input {name}" if last is None else f"row scales of input {name}"
        ir.add_provenance(node, PASS, what)
    root.replace_all_uses_with(codes)
    graph.erase_node(root)
    twin = {codes: scales}
    for view in views:                       # in insertion order: a view's parent is mapped before it
        with graph.inserting_after(view):
            twin[view] = graph.call_function(view.target, (twin[view.args[0]], *view.args[1:]))
        ir.copy_meta(view, twin[view])
        shape = view.meta.get(ir.SHAPE)
        twin[view].meta[ir.SHAPE] = None if shape is None else (*shape[:-1], 1)
        for node in (view, twin[view]):
            _fake(node, lambda parent, v=view: v.target(parent, *v.args[1:]))
    for call, pos in ends:
        args = list(call.args) + [None] * (6 - len(call.args))
        args[pos + 3] = twin[call.args[pos]]    # key -> key_scale, value -> value_scale
        call.args = tuple(args)
        ir.add_provenance(call, PASS, f"{'key' if pos == KEY else 'value'} read from int8 input {name}")
    return codes, scales


def _pair_in_spec(spec: pytree.TreeSpec, leaf: int) -> pytree.TreeSpec | None:
    """`spec` (((args...), {kwargs})) with top-level argument leaf number `leaf` made a (codes, scales)
    tuple; None when that leaf is not a whole top-level argument."""
    args_spec, kwargs_spec = spec.children()
    children, seen = [], 0
    for child in args_spec.children():
        if seen == leaf and child.is_leaf():
            children.append(pytree.tree_structure((0, 0)))
        else:
            children.append(child)
        seen += child.num_leaves
    if children == list(args_spec.children()):
        return None
    return pytree.TreeSpec(tuple, None, [pytree.TreeSpec(tuple, None, children), kwargs_spec])


@register_pass(PASS, kind="transform")
def int8_kv_inputs(gm: fx.GraphModule, ctx) -> PassResult:
    """Turn every qualifying float input into an (int8 codes, scales) input pair."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    done, kept = [], []
    for leaf, root in enumerate(placeholders):
        views, ends, why = _row_uses(gm, root)
        if not ends:                    # no int8 attention reads it: nothing to say
            continue
        if why:
            kept.append(f"{root.target}: {why}")
            continue
        spec = None if info is None or info.in_spec is None else _pair_in_spec(info.in_spec, leaf + len(done))
        if spec is None:
            kept.append(f"{root.target}: not a top-level input of a torch.export capture")
            continue
        _split_input(gm, root, views, ends)
        info = info._replace(in_spec=spec)
        gm.graph._codegen.pytree_info = info
        done.append(str(root.target))
    gm.graph.lint()
    gm.recompile()
    message = (f"{len(done)} input(s) taken as int8 rows + scales ({', '.join(done)})" if done
               else "no input is read only as constant int8 attention keys/values")
    if kept:
        message += "; kept float: " + "; ".join(kept)
    return PassResult(changed=bool(done), message=message)
