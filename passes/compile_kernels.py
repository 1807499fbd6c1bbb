"""codegen: generate, compile and attach C kernels to every lowered LowbitLinear / LowbitConv.

Example:
    codegen                          # best target for this CPU ("native")
    codegen{target=portable}         # plain C kernels
    codegen{fallback=true}           # ops the target cannot serve use portable C or the reference
    codegen{never_slower=false}      # keep every kernel, even where the torch fp32 op is faster

never_slower (default on) times each kernel against the torch op it replaces on the inputs the op receives
from the example inputs, at the current thread count, and keeps the faster; the report's backend column
shows the choice, e.g. "torch-fp32 (kernel 5.3 ms > fp32 1.1 ms)".

Writes each kernel's C source and the generated Python forward (`gm.code`, as forward.py) into
ctx.work_dir when the pipeline gives one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxquant.codegen import attach_kernels, lowered_ops
from fxquant.codegen.build import atomic_write
from fxquant.registry import PassResult, register_pass


@dataclass
class CodegenOptions:
    target: str = "native"   # native | avx512 | avx2 | portable | reference
    fallback: bool = False   # on an unsupported op: portable kernel / reference instead of an error
    cache_dir: str = ""      # compiled-library cache ("" = $FXQUANT_CACHE_DIR or ~/.cache/fxquant)
    never_slower: bool = True  # time each kernel against the torch op it replaces; keep the faster
    timing_budget_ms: float = 30.0  # never_slower: about this much timing per op


def _record_provenance(gm: torch.fx.GraphModule, report) -> None:
    try:
        from fxquant.ir import add_provenance
    except ImportError:  # pragma: no cover - ir.py is part of the core package
        return
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in report.backends:
            kernel = report.attached.get(node.target, "reference")
            add_provenance(node, "codegen", f"kernel {kernel} backend {report.backends[node.target]}")


@register_pass("codegen", options=CodegenOptions, kind="transform")
def codegen_pass(gm, ctx) -> PassResult:
    """Attach generated C kernels to lowered ops (target, fallback, cache_dir options)."""
    opts = ctx.options or CodegenOptions()
    if not lowered_ops(gm):
        return PassResult(changed=False, message="no lowered LowbitLinear/LowbitConv ops")
    report = attach_kernels(
        gm,
        opts.target,
        opts.fallback,
        out_dir=ctx.work_dir,
        cache_dir=opts.cache_dir or None,
        never_slower=opts.never_slower,
        example_inputs=ctx.example_inputs,
        timing_budget_s=opts.timing_budget_ms / 1e3,
    )
    if isinstance(gm, torch.fx.GraphModule):
        _record_provenance(gm, report)
        if ctx.work_dir is not None:
            atomic_write(ctx.work_dir / "forward.py", gm.code)
    message = f"target {opts.target}: {report.summary()}"
    if report.replaced:
        message += "; torch kept: " + "; ".join(
            f"{k}: {report.backends[k]}" for k in list(report.replaced)[:3]
        )
    if report.fell_back:
        message += "; " + "; ".join(f"{k}: {v}" for k, v in list(report.fell_back.items())[:3])
    return PassResult(changed=True, message=message)
