"""What a compiled module accepts: how many inputs, and per input its kind, dtype family, rank, fixed sizes.

Compiled and loaded modules check every call against it before any kernel runs, so a wrong number
of inputs, a wrong rank or a size the graph was specialised to give an InputError that says what
was expected, instead of a pytree error, a guard assertion or a read out of bounds.

Example:
    >>> import torch
    >>> spec = InputSpec([{"name": "x", "kind": "tensor", "dtype": torch.float32, "shape": (None, 64)}])
    >>> spec.check((torch.randn(3, 64),))
    >>> spec.check((torch.randn(3, 64), torch.randn(3)))
    Traceback (most recent call last):
    ...
    fxquant.errors.InputError: this compiled module takes 1 input (x), got 2
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from . import ir
from .errors import InputError

_FAMILIES: dict[torch.dtype, str] = {}


def _family(dtype: torch.dtype) -> str:
    family = _FAMILIES.get(dtype)
    if family is None:
        family = (
            "bool"
            if dtype == torch.bool
            else "floating point"
            if dtype.is_floating_point
            else "complex"
            if dtype.is_complex
            else "integer"
        )
        _FAMILIES[dtype] = family
    return family


class InputSpec:
    """Per graph input: {"name", "kind": "tensor"|"none"|..., "dtype", "shape": (int | None, ...)}."""

    def __init__(self, items: list[dict], in_spec: pytree.TreeSpec | None = None):
        self.items = list(items)
        self.in_spec = in_spec
        # per tensor input: (rank, ((dim, size) fixed), dtype family), so a call costs a few comparisons
        self._fast = [
            (
                len(it["shape"]),
                tuple((i, d) for i, d in enumerate(it["shape"]) if d is not None),
                _family(it["dtype"]),
            )
            if it["kind"] == "tensor"
            else None
            for it in self.items
        ]
        args_spec = in_spec.child(0) if in_spec is not None and in_spec.num_children == 2 else None
        self.n_args = args_spec.num_children if args_spec is not None else len(self.items)
        self._flat = args_spec is None or all(c.is_leaf() for c in args_spec.children())
        self.row_inputs = self._row_inputs(args_spec)
        # the only nested inputs are int8-rows pairs: check() flattens them itself (pytree's: 13 us a call)
        self._pairs_only = args_spec is not None and all(
            c.is_leaf() or i in self.row_inputs for i, c in enumerate(args_spec.children()))

    def _row_inputs(self, args_spec) -> dict[int, str]:
        """{argument position: name} of inputs taken as (int8 codes, scales) pairs (pass int8-kv-inputs)."""
        out, leaf = {}, 0
        for pos, child in enumerate(args_spec.children() if args_spec is not None else ()):
            item = self.items[leaf] if leaf < len(self.items) else {}
            if child.num_leaves == 2 and item.get("format") == "int8-rows":
                out[pos] = item["name"].removesuffix("_int8")
            leaf += child.num_leaves
        return out

    def adapt(self, args: tuple, convert) -> tuple:
        """`args` with a float tensor given for an int8-rows input replaced by convert(position, tensor), the
        (codes, scales) pair (CompiledModule passes a fxquant.kv_rows.RowsMemo's get)."""
        if not self.row_inputs:
            return args
        out = list(args)
        for pos in self.row_inputs:
            if pos < len(out) and isinstance(out[pos], torch.Tensor) and out[pos].is_floating_point():
                out[pos] = convert(pos, out[pos])
        return tuple(out)

    @classmethod
    def from_graph(cls, gm: fx.GraphModule) -> "InputSpec":
        """From the placeholders' traced values (symbolic sizes stay free, concrete ones are fixed)."""
        from torch.fx.experimental.symbolic_shapes import is_concrete_int   # sympy: only when compiling

        items = []
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                shape = tuple(int(d) if is_concrete_int(d) else None for d in val.shape)
                items.append({"name": node.target, "kind": "tensor", "dtype": val.dtype, "shape": shape})
                if node.meta.get(ir.INPUT_FORMAT):
                    items[-1]["format"] = node.meta[ir.INPUT_FORMAT]
            elif val is None and "val" in node.meta:
                items.append({"name": node.target, "kind": "none"})
            elif isinstance(val, (bool, int, float)):
                items.append({"name": node.target, "kind": type(val).__name__})
            else:
                items.append({"name": node.target, "kind": "any"})
        return cls(items, getattr(gm, "_in_spec", None))

    def to_json(self) -> list[dict]:
        """The manifest form (artifact_schema.input_specs reads it back)."""
        return [
            {**it, "dtype": str(it["dtype"]).replace("torch.", ""), "shape": list(it["shape"])}
            if it["kind"] == "tensor"
            else dict(it)
            for it in self.items
        ]

    def names(self) -> str:
        return ", ".join(it["name"] for it in self.items)

    def check(self, args: tuple) -> None:
        """Raise InputError unless `args` (positional) fit the graph."""
        if len(args) != self.n_args:
            plural = "s" if self.n_args != 1 else ""
            raise InputError(
                f"this compiled module takes {self.n_args} input{plural} ({self.names()}), got {len(args)}"
            )
        if self._flat:
            leaves = args
        elif self._pairs_only and all(type(args[p]) is tuple and len(args[p]) == 2 for p in self.row_inputs):
            leaves = [x for i, a in enumerate(args) for x in (a if i in self.row_inputs else (a,))]   # 1 us
        else:
            leaves, spec = pytree.tree_flatten((tuple(args), {}))
            if spec != self.in_spec:
                self._check_rows(args)
                raise InputError(
                    f"the inputs' structure {spec} differs from the one the module was compiled for "
                    f"{self.in_spec}"
                )
        if len(leaves) != len(self.items):
            raise InputError(
                f"this compiled module takes {len(self.items)} tensors/values ({self.names()}), "
                f"got {len(leaves)}"
            )
        for item, fast, value in zip(self.items, self._fast, leaves):
            if fast is None:
                continue
            rank, fixed, family = fast
            if (
                type(value) is not torch.Tensor
                or not value.is_cpu
                or value.dim() != rank
                or any(value.shape[i] != d for i, d in fixed)
                or _family(value.dtype) != family
            ):
                self._check_one(item, value)  # says what is wrong (a Tensor subclass may pass there)

    def _check_rows(self, args: tuple) -> None:
        """Raise the InputError that says what an int8-rows input takes, when one was given something else."""
        for pos, name in self.row_inputs.items():
            value = args[pos]
            if not (isinstance(value, tuple) and len(value) == 2) and not isinstance(value, torch.Tensor):
                raise InputError(
                    f"input {name!r} takes per-row int8 keys/values: a float tensor, or the pair "
                    f"(codes, scales) from fxquant.kv_rows.quantize_rows; got {type(value).__name__}"
                    + (f" of {len(value)}" if isinstance(value, (tuple, list)) else "")
                )

    @staticmethod
    def _check_one(item: dict, value: Any) -> None:
        name, kind = item["name"], item["kind"]
        if kind != "tensor":
            return
        if not isinstance(value, torch.Tensor):
            raise InputError(f"input {name!r} must be a tensor, got {type(value).__name__}")
        if value.device.type != "cpu":
            raise InputError(
                f"input {name!r} is on device {value.device}; fxquant modules run on the CPU: "
                f"pass a CPU tensor (x.cpu()), not a meta or accelerator tensor"
            )
        want = item["shape"]
        if value.dim() != len(want) or any(w is not None and w != d for w, d in zip(want, value.shape)):
            shown = "(" + ", ".join("any" if w is None else str(w) for w in want) + ")"
            raise InputError(
                f"input {name!r} has shape {tuple(value.shape)}; this module was specialised to shape "
                f"{shown} (dims marked 'any' may vary). Compile with example inputs of the size you run"
            )
        if _family(value.dtype) != _family(item["dtype"]):
            raise InputError(
                f"input {name!r} has dtype {value.dtype}; this module expects a "
                f"{_family(item['dtype'])} tensor ({item['dtype']})"
            )
