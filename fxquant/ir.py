"""The IR contract: the one canonical graph form and every `node.meta` key passes may use.

Canonical form (what `fxquant.capture` returns and every pass sees): a `torch.fx.GraphModule`
whose compute nodes are ATen `call_function` nodes (e.g. `aten.linear.default`,
`aten.conv2d.default`), parameters and buffers read through `get_attr`, and lowered fxquant ops
as `call_module` nodes (`fxquant.ops.LowbitLinear` / `LowbitConv`).

node.meta keys (all owned by this module; passes read and write only these):

=================  ==========================  ======================================================
key                type                        written by
=================  ==========================  ======================================================
MODULE             str  ("encoder.conv1")      capture: fully qualified name of the source module
MODULE_TYPE        str  ("Conv1d")             capture: class name of that module
SOURCE             str  ("model.py:42")        capture: user source line that created the node
SHAPE              tuple[int, ...] | None      propagate-shapes (for the example inputs)
DTYPE              str  ("float32")            propagate-shapes
DECISION           QuantDecision               assign-precision / rules (one per quantizable node)
PROVENANCE         tuple[str, ...]             every pass that created or changed the node
ACT_STATS          dict                        calibration observers
SENSITIVITY        dict[str, float]            sensitivity: candidate format label -> output error
QUANT_STATS        dict                        quantize: {"bytes", "fp32_bytes", "sqnr_db", "params"}
INPUT_FORMAT       str  ("int8-rows")          int8-kv-inputs: a placeholder's codes / "row-scales"
=================  ==========================  ======================================================

Example:
    >>> d = QuantDecision(weight_bits=4, scheme="uniform", granularity="group", group_size=64,
    ...                   decided_by="rule:encoder.*")
    >>> d.label()
    'W4 uniform/g64 A8'
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx

MODULE = "fxq_module"
MODULE_TYPE = "fxq_module_type"
SOURCE = "fxq_source"
SHAPE = "fxq_shape"
DTYPE = "fxq_dtype"
DECISION = "fxq_decision"
PROVENANCE = "fxq_provenance"
ACT_STATS = "fxq_act_stats"
SENSITIVITY = "fxq_sensitivity"
QUANT_STATS = "fxq_quant_stats"
INPUT_FORMAT = "fxq_input_format"
ALL_KEYS = (
    MODULE,
    MODULE_TYPE,
    SOURCE,
    SHAPE,
    DTYPE,
    DECISION,
    PROVENANCE,
    ACT_STATS,
    SENSITIVITY,
    QUANT_STATS,
    INPUT_FORMAT,
)

aten = torch.ops.aten
LINEAR_TARGETS = (aten.linear.default,)
CONV_TARGETS = (aten.conv1d.default, aten.conv2d.default)
QUANTIZABLE_TARGETS = LINEAR_TARGETS + CONV_TARGETS


@dataclass(frozen=True)
class QuantDecision:
    """The format chosen for one node, and who chose it.

    weight_bits None means the node stays in floating point.
    """

    weight_bits: int | None
    scheme: str = "uniform"  # "uniform" | "codebook" | "float"
    granularity: str = "group"  # "tensor" | "channel" | "group"
    group_size: int | None = None  # for granularity "group"
    symmetric: bool = True
    act_bits: int | None = 8  # 8 = dynamic per-token int8; None = float activations
    act_mode: str = "dynamic"  # "dynamic" | "static"
    rounding: str = "nearest"  # "nearest" | "gptq"
    decided_by: str = "default"  # e.g. "rule:re:.*attn.*", "pass:assign-precision"

    def label(self) -> str:
        if self.weight_bits is None:
            return "float"
        gran = {"tensor": "tensor", "channel": "channel"}.get(self.granularity, f"g{self.group_size}")
        act = f"A{self.act_bits}" if self.act_bits else "Afp"
        return f"W{self.weight_bits} {self.scheme}/{gran} {act}"

    def with_(self, **changes: Any) -> "QuantDecision":
        return replace(self, **changes)


def is_quantizable(node: fx.Node) -> bool:
    """True for linear/conv call_function nodes whose weight is a get_attr parameter."""
    return (
        node.op == "call_function"
        and node.target in QUANTIZABLE_TARGETS
        and len(node.args) > 1
        and isinstance(node.args[1], fx.Node)
        and node.args[1].op == "get_attr"
    )


def get_attr_value(gm: fx.GraphModule, target: str) -> Any:
    """Resolve a dotted get_attr target on gm (e.g. 'encoder.conv1.weight')."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def node_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The weight tensor of a quantizable node."""
    return get_attr_value(gm, node.args[1].target)


def add_provenance(node: fx.Node, pass_name: str, message: str = "") -> None:
    """Append 'pass: message' to the node's provenance (tuple, so history is never mutated)."""
    entry = f"{pass_name}: {message}" if message else pass_name
    node.meta[PROVENANCE] = tuple(node.meta.get(PROVENANCE, ())) + (entry,)


def set_decision(node: fx.Node, decision: QuantDecision, pass_name: str) -> None:
    node.meta[DECISION] = decision
    add_provenance(node, pass_name, f"decision {decision.label()} ({decision.decided_by})")


def module_of(node: fx.Node) -> str:
    return node.meta.get(MODULE, "")


def copy_meta(src: fx.Node, dst: fx.Node) -> None:
    """Give a replacement node its original's module, source and provenance."""
    for key in ALL_KEYS:
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def verify(gm: fx.GraphModule) -> None:
    """Graph lint plus the meta contract; raises VerificationError naming the offending node."""
    from .errors import VerificationError

    try:
        gm.graph.lint()
    except Exception as exc:  # fx raises RuntimeError with the bad node in the text
        raise VerificationError(f"graph lint failed: {exc}") from exc
    for node in gm.graph.nodes:
        meta = node.meta
        problems = []
        if node.op in ("call_function", "call_module") and not isinstance(meta.get(MODULE), str):
            problems.append(f"missing {MODULE} (module name)")
        if not isinstance(meta.get(PROVENANCE, ()), tuple):
            problems.append(f"{PROVENANCE} must be a tuple of strings")
        if DECISION in meta and not isinstance(meta[DECISION], QuantDecision):
            problems.append(f"{DECISION} must be a QuantDecision, got {type(meta[DECISION]).__name__}")
        if SHAPE in meta and meta[SHAPE] is not None and not isinstance(meta[SHAPE], tuple):
            problems.append(f"{SHAPE} must be a tuple or None")
        if problems:
            raise VerificationError(
                f"node {node.name!r} ({node.op} {node.target}) breaks the IR contract: " + "; ".join(problems)
            )


# ops whose weights fxquant cannot quantize (no lowered op or kernel): their fp32 weights still count
UNQUANTIZED_WEIGHT_OPS = (aten.lstm.input, aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input)


def float_weights(gm: fx.GraphModule, node: fx.Node) -> list[torch.Tensor]:
    """The float parameters a node reads through get_attr (nested in lists, as aten.lstm's params are)."""
    found: list[torch.Tensor] = []
    fx.node.map_arg(
        (node.args, node.kwargs),
        lambda n: found.append(get_attr_value(gm, n.target)) if n.op == "get_attr" else None,
    )
    return [t for t in found if isinstance(t, torch.Tensor) and t.is_floating_point()]


def unquantized_weight_params(gm: fx.GraphModule) -> int:
    """Parameters of ops fxquant keeps in fp32 (LSTM/GRU/RNN weights): budgets count them at 32 bits."""
    return sum(
        t.numel()
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in UNQUANTIZED_WEIGHT_OPS
        for t in float_weights(gm, n)
    )
