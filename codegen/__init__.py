"""fxquant.codegen: generated C kernels (jinja2 templates -> gcc -> ctypes) for lowered low-bit ops.

Example:
    >>> from fxquant import codegen
    >>> codegen.detect_host().name in ("avx512", "avx2", "portable")
    True
    >>> kernel = codegen.compile_op(op, target="native")          # doctest: +SKIP
    >>> report = codegen.attach_kernels(gm, target="native")      # doctest: +SKIP
    >>> codegen.pool_stats()["helpers"]                           # doctest: +SKIP
    1
"""
from .attach import AttachReport, attach_kernels, lowered_ops
from .attention import AttentionKernel, attention_kernel
from .build import BuildError, build_library, cache_dir, find_compiler
from .kernels import GroupedConvKernel, Im2colConvKernel, LinearKernel, compile_op
from .never_slower import Float32Fallback
from .packing import analyze_tables, pack_avx512, pack_portable
from .render import UnsupportedOp, render_linear
from .targets import TARGETS, Target, detect_host, resolve_target
from .threadpool import pool_stats

__all__ = [
    "AttachReport",
    "AttentionKernel",
    "BuildError",
    "Float32Fallback",
    "GroupedConvKernel",
    "Im2colConvKernel",
    "LinearKernel",
    "TARGETS",
    "Target",
    "UnsupportedOp",
    "analyze_tables",
    "attach_kernels",
    "attention_kernel",
    "build_library",
    "cache_dir",
    "compile_op",
    "detect_host",
    "find_compiler",
    "lowered_ops",
    "pack_avx512",
    "pack_portable",
    "pool_stats",
    "render_linear",
    "resolve_target",
]
