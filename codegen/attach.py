"""Attach compiled kernels to every LowbitLinear / LowbitConv / FusedAttention of a GraphModule.

Example:
    >>> report = attach_kernels(gm, target="native", out_dir="build/kernels")   # doctest: +SKIP
    >>> report.attached["encoder.fc1"]                                           # doctest: +SKIP
    'linear_avx512_w4g64'
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fxquant.ops import FusedAttention, LowbitConv, LowbitLinear

from .build import BuildError, atomic_write
from .kernels import compile_op
from .render import UnsupportedOp
from .targets import resolve_target


@dataclass
class AttachReport:
    """What attach_kernels did: module name -> kernel name, plus ops left on another backend."""

    attached: dict[str, str] = field(default_factory=dict)
    backends: dict[str, str] = field(default_factory=dict)
    fell_back: dict[str, str] = field(default_factory=dict)  # module name -> reason
    sources: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        kinds = sorted(set(self.backends.values()))
        msg = f"{len(self.attached)} kernels attached ({', '.join(kinds) or 'none'})"
        return msg + (f", {len(self.fell_back)} fell back" if self.fell_back else "")


def lowered_ops(gm: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, (LowbitLinear, LowbitConv, FusedAttention))]


def _try(op, target, cache_dir):
    try:
        return compile_op(op, target, cache_dir), None
    except (UnsupportedOp, BuildError) as e:
        return None, str(e)


def attach_kernels(gm: torch.nn.Module, target: str = "native", fallback: bool = False,
                   out_dir: str | Path | None = None, cache_dir: str | None = None) -> AttachReport:
    """Compile and attach a kernel to each lowered op (op.kernel, op.backend = "c:<target>").

    target="reference" detaches all kernels.  With fallback=True an op the target cannot serve
    gets the portable kernel instead (or stays on the reference path, with a warning); with
    fallback=False the UnsupportedOp / BuildError is raised.  Sources go to out_dir/<module>.c.
    """
    report = AttachReport()
    if target == "reference":
        for name, op in lowered_ops(gm):
            op.kernel, op.backend = None, "reference"
            report.backends[name] = "reference"
        return report
    t = resolve_target(target)
    for name, op in lowered_ops(gm):
        if not fallback:
            kernel, used, err = compile_op(op, t, cache_dir), t.name, None
        else:
            kernel, err = _try(op, t, cache_dir)
            used = t.name
            if kernel is None and t.name != "portable":
                kernel, err2 = _try(op, "portable", cache_dir)
                used, err = "portable", (f"{err}; portable used instead" if kernel else f"{err}; {err2}")
        if kernel is None:
            warnings.warn(f"codegen: {name} stays on the reference path: {err}")
            op.kernel, op.backend = None, "reference"
            report.fell_back[name] = err or ""
            report.backends[name] = "reference"
            continue
        if err:
            report.fell_back[name] = err
        op.kernel, op.backend = kernel, f"c:{used}"
        report.attached[name], report.backends[name] = kernel.name, op.backend
        if out_dir is not None:
            path = Path(out_dir) / f"{name.replace('.', '_') or 'root'}.c"
            atomic_write(path, kernel.source)
            report.sources[name] = path
    return report
