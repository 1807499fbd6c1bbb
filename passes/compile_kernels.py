"""codegen: generate, compile and attach C kernels to every lowered LowbitLinear / LowbitConv.

Example:
    codegen                          # best target for this CPU ("native")
    codegen{target=portable}         # plain C kernels
    codegen{fallback=true}           # ops the target cannot serve use portable C or the reference

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
    report = attach_kernels(gm, opts.target, opts.fallback, out_dir=ctx.work_dir, cache_dir=opts.cache_dir or None)
    if isinstance(gm, torch.fx.GraphModule):
        _record_provenance(gm, report)
        if ctx.work_dir is not None:
            atomic_write(ctx.work_dir / "forward.py", gm.code)
    message = f"target {opts.target}: {report.summary()}"
    if report.fell_back:
        message += "; " + "; ".join(f"{k}: {v}" for k, v in list(report.fell_back.items())[:3])
    return PassResult(changed=True, message=message)
