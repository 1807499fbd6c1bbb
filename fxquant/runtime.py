"""Compiled modules: the drop-in result of compile_lowbit, and its per-node report.

Example:
    >>> cm = fxquant.compile_lowbit(model, inputs, bits=4)   # doctest: +SKIP
    >>> print(cm.report())                                  # doctest: +SKIP
"""
from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from tabulate import tabulate
from torch import nn

from . import ir
from .ir import UNQUANTIZED_WEIGHT_OPS, float_weights as _float_weights
from .errors import InputError
from .kv_rows import Int8RowInputs
from .ops import LowbitLinear, _LowbitBase, is_lowered

REPORT_COLUMNS = ("node", "module", "op", "weight", "format", "decided_by", "bytes", "fp32_bytes", "sqnr_db",
                  "backend")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def node_rows(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """One row per weight-carrying node (quantized or left in float), from node.meta."""
    rows = []
    for node in gm.graph.nodes:
        op = weight = None
        module = None
        if node.op == "call_module" and isinstance(module := gm.get_submodule(node.target), _LowbitBase):
            op = "linear" if isinstance(module, LowbitLinear) else f"conv{module.dims}d"
            n_out, k = module.code_shape
            weight = f"{k}->{n_out}"
            nbytes = module.nbytes() + (0 if module.bias is None else module.bias.numel() * 4)
            params = n_out * k
            backend = module.backend
        elif node.op == "call_function" and node.target in UNQUANTIZED_WEIGHT_OPS:
            weights = _float_weights(gm, node)
            if not weights:
                continue
            op = node.target.__name__.split(".")[0]
            params = sum(t.numel() for t in weights if t.dim() >= 2)
            weight = f"{params} params"
            nbytes = sum(t.numel() * t.element_size() for t in weights)
            rows.append(
                {
                    "node": node.name,
                    "module": node.meta.get(ir.MODULE, ""),
                    "op": op,
                    "weight": weight,
                    "format": "float",
                    "bits": 32,
                    "decided_by": "no quantized kernel",
                    "bytes": nbytes,
                    "fp32_bytes": nbytes,
                    "params": params,
                    "sqnr_db": None,
                    "backend": "torch",
                }
            )
            continue
        elif ir.is_quantizable(node):
            w = ir.node_weight(gm, node)
            op = node.target.__name__.split(".")[0]
            weight = f"{math.prod(w.shape[1:])}->{w.shape[0]}"
            params = w.numel()
            bias = node.args[2] if len(node.args) > 2 else None
            nbytes = w.numel() * w.element_size() + (
                ir.get_attr_value(gm, bias.target).numel() * 4 if isinstance(bias, fx.Node) else 0
            )
            backend = "torch"
        else:
            continue
        decision = node.meta.get(ir.DECISION)
        stats = node.meta.get(ir.QUANT_STATS, {})
        rows.append(
            {
                "node": node.name,
                "module": node.meta.get(ir.MODULE, ""),
                "op": op,
                "weight": weight,
                "format": decision.label() if decision else "float",
                "bits": decision.weight_bits if decision and decision.weight_bits else 32,
                "decided_by": decision.decided_by if decision else "",
                "bytes": nbytes,
                "fp32_bytes": stats.get("fp32_bytes", nbytes),
                "params": params,
                "sqnr_db": stats.get("sqnr_db"),
                "backend": backend,
            }
        )
    return rows


def unquantized_weight_warning(rows: list[dict]) -> str | None:
    """The warning compile_lowbit gives when weights of ops it cannot quantize (LSTM/GRU) stay fp32."""
    kept = [r for r in rows if r["decided_by"] == "no quantized kernel"]
    if not kept or all(r["format"] == "float" for r in rows):  # nothing was quantized: nothing to warn about
        return None
    total = sum(r["params"] for r in rows) or 1
    share = sum(r["params"] for r in kept) / total
    names = ", ".join(f"{r['module'] or r['node']} ({r['op']}, {r['params']} weights)" for r in kept[:4])
    avg = summarize(rows, 1, 1)["avg_weight_bits"]
    return (
        f"{share:.0%} of the weights stay fp32 because fxquant has no quantized kernel for them: {names}. "
        f"They count at 32 bits in the report (average weight bits {avg:.2f}). For recurrent layers use "
        f"torch.ao.quantization.quantize_dynamic, or compile the other parts with submodules=[...]"
    )


def attention_line(gm: fx.GraphModule) -> str:
    """A report line for the lossy step that is not a weight format: constant attention K/V as int8."""
    from .ops import FusedAttention

    ops = [m for m in gm.modules() if isinstance(m, FusedAttention)]
    if not ops:
        return ""
    n8 = sum(bool(m.kv_int8) for m in ops)
    return (
        f"\nattention: {len(ops)} fused ops; {n8} read constant keys/values as per-row int8 "
        f"(compile option kv_bits=None keeps them float32)"
    )


def summarize(
    rows: list[dict], total_bytes: int, fp32_total: int, resident: int | None = None
) -> dict[str, Any]:
    params = sum(r["params"] for r in rows)
    avg_bits = sum(r["bits"] * r["params"] for r in rows) / params if params else 32.0
    out = {
        "weight_nodes": len(rows),
        "avg_weight_bits": avg_bits,
        "model_bytes": total_bytes,
        "fp32_bytes": fp32_total,
        "compression": fp32_total / total_bytes if total_bytes else float("nan"),
    }
    if resident is not None:
        out["resident_bytes"] = resident
    return out


def render_report(rows: list[dict], summary: dict, timings=None) -> str:
    body = [
        [
            r["node"],
            r["module"],
            r["op"],
            r["weight"],
            r["format"],
            r["decided_by"],
            _fmt_bytes(r["bytes"]),
            _fmt_bytes(r["fp32_bytes"]),
            "" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}",
            r["backend"],
        ]
        for r in rows
    ]
    text = tabulate(body, headers=list(REPORT_COLUMNS), tablefmt="simple")
    text += (
        f"\n\nmodel bytes {_fmt_bytes(summary['model_bytes'])} (fp32 {_fmt_bytes(summary['fp32_bytes'])}, "
        f"{summary['compression']:.2f}x smaller); average weight bits {summary['avg_weight_bits']:.2f} "
        f"over {summary['weight_nodes']} weight nodes"
    )
    if summary.get("resident_bytes") is not None:
        text += f"; resident weight memory {_fmt_bytes(summary['resident_bytes'])} (ops + kernels)"
    if timings:
        text += "\n\n" + tabulate(
            [[t.name, f"{t.seconds * 1e3:.1f}", "yes" if t.changed else "", t.message] for t in timings],
            headers=["pass", "ms", "changed", "result"],
            tablefmt="simple",
        )
    return text


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer, with lowered weights at their packed size.

    Storage shared by several modules (a tied embedding lookup and its projection) counts once.
    """
    total, seen = 0, set()
    for mod in module.modules():
        if is_lowered(mod):
            key = mod.scales.untyped_storage().data_ptr()  # tied ops share their scales
            if key not in seen:
                seen.add(key)
                total += mod.nbytes()
            if getattr(mod, "bias", None) is not None:
                total += mod.bias.numel() * 4
            continue
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None and t.is_floating_point() and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.numel() * t.element_size()
    return total


def resident_bytes(module: nn.Module) -> int:
    """Bytes of every distinct tensor storage the module keeps: parameters, buffers, lowered ops' packed
    codes and their attached kernels' copies (what loading the model costs in memory)."""
    storages = {}
    for mod in module.modules():
        tensors = [t for t in list(mod._parameters.values()) + list(mod._buffers.values()) if t is not None]
        if hasattr(mod, "resident_tensors"):
            tensors += mod.resident_tensors()
        for t in tensors:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


KERNEL_SHARE_FOR_POOL = 0.5  # weight share in C kernels from which the forward runs torch on one thread


class CompiledModule(Int8RowInputs, nn.Module):
    """The compiled model: call it like the original; `.graph_module`, `.report()`, `.report_rows()`."""

    def __init__(
        self,
        gm: fx.GraphModule,
        pipeline: str,
        timings=None,
        config=None,
        signature=None,
        name: str = "",
        fp32_bytes: int | None = None,
        example_inputs: tuple | None = None,
        input_spec=None,
    ):
        super().__init__()
        from .input_spec import InputSpec

        if getattr(gm, "validate_inputs", False):
            # torch.export's module re-checks the inputs' pytree in a forward pre-hook (~50 us a call, half
            # of a small compiled layer's call); self.input_spec checks them first, the graph's guards run
            gm.validate_inputs = False
        self.graph_module = gm
        self.input_spec = input_spec if input_spec is not None else InputSpec.from_graph(gm)
        self.example_inputs = example_inputs
        self.pipeline = pipeline
        self.timings = list(timings or [])
        self.config = dict(config or {})
        self.name = name
        self._signature = signature
        if signature is not None:
            self.__signature__ = signature
        self.fp32_bytes = fp32_bytes if fp32_bytes is not None else tensor_bytes(gm)

    def forward(self, *args, **kwargs):
        if kwargs:
            if self._signature is None:
                raise TypeError("this compiled module takes positional arguments only")
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args, kwargs = tuple(bound.arguments.values()), {}
        if self.input_spec.row_inputs:    # float keys/values given for an int8-rows input: converted once
            args = self.input_spec.adapt(args, self._rows_memo().get)
        self.input_spec.check(args)
        if torch.get_num_threads() > 1 and self.kernels_own_threads():
            from .codegen.threadpool import pool_owns_threads

            with pool_owns_threads():
                return self._run_graph(args)
        return self._run_graph(args)

    def kernels_own_threads(self) -> bool:
        """True when fxquant's C kernels carry most of the weights (>= KERNEL_SHARE_FOR_POOL of them): the
        forward then runs torch's own glue ops on one thread while the kernels keep the thread count
        (threadpool.pool_owns_threads), so no OpenMP worker spins or waits on a busy machine (measured on
        Whisper tiny.en avg 4, encoder with one core busy: 162 ms -> 107 ms; 65 -> 63 ms quiet)."""
        owns = self.__dict__.get("_kernels_own_threads")
        if owns is None:
            rows = self.report_rows()
            total = sum(r["params"] for r in rows)
            in_kernels = sum(r["params"] for r in rows if str(r.get("backend", "")).startswith("c:"))
            owns = total > 0 and in_kernels >= KERNEL_SHARE_FOR_POOL * total
            self.__dict__["_kernels_own_threads"] = owns
        return owns

    def _run_graph(self, args: tuple):
        try:
            return self.graph_module(*args)
        except AssertionError as exc:
            if "Guard failed" not in str(exc):
                raise
            shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            raise InputError(
                f"inputs of shapes ({shapes}) break an assumption the captured graph was "
                f"specialised to ({str(exc).replace('Guard failed: ', '')}); torch.export fixed "
                f"that size while tracing. Compile with example inputs of the size you run, or "
                f"compile once per size"
            ) from None

    def report_rows(self) -> list[dict[str, Any]]:
        return node_rows(self.graph_module)

    def summary(self) -> dict[str, Any]:
        return summarize(
            self.report_rows(),
            tensor_bytes(self.graph_module),
            self.fp32_bytes,
            resident_bytes(self.graph_module),
        )

    def report(self, passes: bool = False, profile: bool = False, inputs: tuple | None = None) -> str:
        """Per-node table (format, who decided, bytes, SQNR, backend) and a summary line.

        passes=True adds per-pass compile times; profile=True times every node on `inputs`
        (default: the example inputs given at compile time) and splits the forward time into
        low-bit kernels, other torch ops and glue.
        """
        title = f"fxquant report{f' for {self.name}' if self.name else ''} (pipeline: {self.pipeline})\n"
        text = title + render_report(self.report_rows(), self.summary(), self.timings if passes else None)
        text += attention_line(self.graph_module)
        if profile:
            from .profiling import profile as run_profile, render_profile

            inputs = inputs if inputs is not None else self.example_inputs
            if inputs is not None and self.input_spec.row_inputs:
                inputs = self.input_spec.adapt(tuple(inputs), self._rows_memo().get)
            if inputs is None:
                raise TypeError(
                    "report(profile=True) needs inputs=(...) for a module loaded from an artifact"
                )
            text += "\n\n" + render_profile(run_profile(self.graph_module, tuple(inputs)))
        return text

    def save(self, directory) -> "Path":
        """Write a self-contained artifact (no pickle); reload it with fxquant.load(directory)."""
        from .artifact_save import save

        return save(self, directory)

    @property
    def code(self) -> str:
        """The generated Python forward of the lowered graph."""
        return self.graph_module.code


class CompiledSubmodules(nn.Module):
    """A model whose chosen submodules were compiled separately; its own forward/loops are unchanged."""

    def __init__(self, model: nn.Module, compiled: dict[str, CompiledModule], fp32_bytes: int):
        super().__init__()
        self.model = model
        self.fp32_bytes = fp32_bytes
        self.compiled_names = list(compiled)
        try:
            self.__signature__ = inspect.signature(model.forward)
        except (TypeError, ValueError):
            pass

    @property
    def compiled(self) -> dict[str, CompiledModule]:
        return {n: self.model.get_submodule(n) for n in self.compiled_names}

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def report_rows(self) -> list[dict[str, Any]]:
        return [dict(r, node=f"{n}:{r['node']}") for n, cm in self.compiled.items() for r in cm.report_rows()]

    def summary(self) -> dict[str, Any]:
        return summarize(
            self.report_rows(), tensor_bytes(self.model), self.fp32_bytes, resident_bytes(self.model)
        )

    def save(self, directory) -> "Path":
        """Write every compiled part (no pickle); reload with fxquant.load(directory, model=float_model)."""
        from .artifact_parts import save_parts

        return save_parts(self, directory)

    def report(self, passes: bool = False) -> str:
        return (
            "\n\n".join(cm.report(passes) for cm in self.compiled.values())
            + "\n\nwhole model: "
            + render_report([], self.summary()).split("\n\n")[-1]
        )
