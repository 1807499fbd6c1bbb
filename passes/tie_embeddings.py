"""tie-embeddings: let embedding lookups read the packed table of a quantized tied projection.

When a table feeds both `aten.embedding` and a quantized linear (Whisper: token embedding and
logits), the lookup becomes a `LowbitEmbedding` sharing that linear's QuantizedWeight (from the
PackedWeights analysis that quantize provides), so the float table is dropped after `lower`.
Runs between quantize and lower; it touches only embedding nodes, so it preserves the analyses.
Untied embeddings are left alone, with the reason in provenance.

Example:
    ...,quantize,tie-embeddings,lower,codegen
"""

from __future__ import annotations

import torch

from fxquant import ir
from fxquant.analysis import CalibrationData, PackedWeights, PrecisionPlan, SensitivityTable
from fxquant.ops import LowbitEmbedding
from fxquant.registry import PassResult, register_pass

aten = torch.ops.aten


@register_pass(
    "tie-embeddings",
    kind="transform",
    requires=(PackedWeights,),
    preserves=(CalibrationData, SensitivityTable, PrecisionPlan, PackedWeights),
)
def tie_embeddings(gm, ctx) -> PassResult:
    """Replace embedding lookups of tied, quantized tables by LowbitEmbedding."""
    qweights = ctx.analyses.get(PackedWeights, needed_by="tie-embeddings").weights
    by_weight = {
        n.args[1].target: qweights[n.name]
        for n in gm.graph.nodes
        if ir.is_quantizable(n) and n.name in qweights and n.target in ir.LINEAR_TARGETS
    }
    tied = untied = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.embedding.default:
            continue
        weight, tokens = node.args[0], node.args[1]
        if getattr(weight, "op", None) != "get_attr" or weight.target not in by_weight:
            ir.add_provenance(node, "tie-embeddings", "left float: its table feeds no quantized linear")
            untied += 1
            continue
        padding_idx = node.args[2] if len(node.args) > 2 and node.args[2] != -1 else None
        name = weight.target.replace(".", "_") + "_lowbit_lookup"
        gm.add_submodule(name, LowbitEmbedding(by_weight[weight.target], padding_idx))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (tokens,))
        ir.copy_meta(node, new)
        ir.add_provenance(new, "tie-embeddings", f"lookup shares the packed table of {weight.target}")
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        tied += 1
    return PassResult(
        changed=tied > 0,
        message=f"{tied} tied embedding lookups share packed tables"
        + (f", {untied} left float" if untied else ""),
    )
