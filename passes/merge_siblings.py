"""merge-siblings (transform): lowered linears reading the same input become one wider kernel call.

Attention blocks project one normalised input three times (query, key, value). After `lower`, every
group of `LowbitLinear` ops that read the same tensor and share a format (bits, group size, scheme,
activation bits, epilogue) is replaced by one LowbitLinear over the stacked rows
(`qweight.concat_rows`, biases zero-filled where a part has none), followed by a slice of the output
per original op. The numbers are unchanged (rows are independent; dynamic activation scales are per
input row); a decode step saves two kernel calls and two activation quantizations per block.
Decisions were made per node before this pass, so rules and the report keep their meaning; the
merged node's module reads "a.query+key+value" and its stats add up the parts.

Example:
    ...,quantize,tie-embeddings,lower,merge-siblings,lower-attention,codegen
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.graphutil import fresh_submodule_name
from fxquant.ops import LowbitEmbedding, LowbitLinear
from fxquant.qweight import concat_rows
from fxquant.registry import PassResult, register_pass

PASS = "merge-siblings"
aten = torch.ops.aten


def _merge_key(mod: LowbitLinear) -> tuple:
    return (mod.code_shape[1], mod.bits, mod.group_size, mod.scheme, mod.act_bits, mod.epilogue)


def _sibling_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    groups: dict[tuple, list[fx.Node]] = {}
    looked_up = {m.scales.data_ptr() for m in gm.modules() if isinstance(m, LowbitEmbedding)}
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        mod = gm.get_submodule(node.target)
        if type(mod) is not LowbitLinear or mod.ln_eps is not None or mod.residual:
            continue  # static-activation subclasses carry per-op input scales; fused ops have own inputs
        if mod.scales.data_ptr() in looked_up:
            continue  # a tied table shared with a lookup (tie-embeddings): merging would copy it
        groups.setdefault((node.args[0], _merge_key(mod)), []).append(node)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


MAX_NAME = 120   # artifact module names are at most 200 characters


def _merged_module_name(nodes: list[fx.Node]) -> str:
    """'attn.query+key+value' for siblings of one parent; 'first.path+7more' when the joined name is long
    (e.g. the key/value projections of every decoder layer reading the same audio features)."""
    paths = [ir.module_of(n) or n.name for n in nodes]
    prefix = paths[0].rsplit(".", 1)[0] if "." in paths[0] else ""
    if prefix and all(p.startswith(prefix + ".") for p in paths):
        name = prefix + "." + "+".join(p[len(prefix) + 1:] for p in paths)
    else:
        name = "+".join(paths)
    return name if len(name) <= MAX_NAME else f"{paths[0]}+{len(paths) - 1}more"


def _merge(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    mods = [gm.get_submodule(n.target) for n in nodes]
    qw = concat_rows([m.qweight for m in mods])
    bias = None
    if any(m.bias is not None for m in mods):
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.code_shape[0]) for m in mods])
    merged = LowbitLinear(qw, bias, act_bits=mods[0].act_bits, epilogue=mods[0].epilogue)
    module_path = _merged_module_name(nodes)
    name = fresh_submodule_name(gm, module_path)
    gm.add_submodule(name, merged)
    first = nodes[0]
    with gm.graph.inserting_before(first):
        call = gm.graph.call_module(name, first.args)
    ir.copy_meta(first, call)
    call.meta[ir.MODULE] = module_path
    stats = [n.meta.get(ir.QUANT_STATS, {}) for n in nodes]
    sqnrs = [s.get("sqnr_db") for s in stats if s.get("sqnr_db") is not None]
    call.meta[ir.QUANT_STATS] = {"params": sum(s.get("params", 0) for s in stats),
                                 "fp32_bytes": sum(s.get("fp32_bytes", 0) for s in stats),
                                 "bytes": qw.nbytes(), "sqnr_db": min(sqnrs) if sqnrs else None}
    ir.add_provenance(call, PASS, "rows of " + ", ".join(n.name for n in nodes))
    start, anchor = 0, call
    for node, mod in zip(nodes, mods):
        end = start + mod.code_shape[0]
        with gm.graph.inserting_after(anchor):
            part = anchor = gm.graph.call_function(aten.slice.Tensor, (call, -1, start, end))
        ir.copy_meta(node, part)
        ir.add_provenance(part, PASS, f"output columns {start}:{end} of {name}")
        node.replace_all_uses_with(part)
        gm.graph.erase_node(node)
        if "." not in node.target:
            delattr(gm, node.target)
        start = end


@register_pass(PASS, kind="transform")
def merge_siblings(gm: fx.GraphModule, ctx) -> PassResult:
    """Merge LowbitLinear ops that share their input and format into one call plus output slices."""
    groups = _sibling_groups(gm)
    for nodes in groups:
        _merge(gm, nodes)
    gm.recompile()
    merged = sum(len(g) for g in groups)
    return PassResult(changed=bool(groups), message=f"{merged} linears merged into {len(groups)} calls")
