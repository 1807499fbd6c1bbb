"""Attach compiled kernels to every LowbitLinear / LowbitConv / FusedAttention / LowbitEmbedding of a graph.

Kernels are built concurrently (BUILD_WORKERS compiler processes at a time; codegen/build.py serialises
builds of one source, so two ops with the same shape compile once) and attached in graph order.

With never_slower=True (and example inputs) each kernel is timed against the torch op it replaces and the
faster one is kept (see never_slower.py); an op whose recorded choice is the torch op (`op.kernel_choice`,
e.g. in a loaded artifact) gets it again without re-timing.

Example:
    >>> report = attach_kernels(gm, target="native", out_dir="build/kernels")   # doctest: +SKIP
    >>> report.attached["encoder.fc1"]                                           # doctest: +SKIP
    'linear_avx512_w4g64'
    >>> report = attach_kernels(gm, never_slower=True, example_inputs=(x,))     # doctest: +SKIP
    >>> report.backends["pos_conv"]                                              # doctest: +SKIP
    'torch-fp32 (kernel 5.3 ms > fp32 1.1 ms)'
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fxquant.ops import FusedAttention, LowbitConv, LowbitEmbedding, LowbitLinear

from .build import BuildError, atomic_write
from .embedding_rows import embedding_rows, serves
from .kernels import compile_op
from .never_slower import TORCH_CHOICE, Timing, capture_op_inputs, decide, fallback_for, kernel_serves
from .render import UnsupportedOp
from .targets import resolve_target


BUILD_WORKERS = max(1, min(4, os.cpu_count() or 1))


@dataclass
class AttachReport:
    """What attach_kernels did: module name -> kernel name, plus ops left on another backend."""

    attached: dict[str, str] = field(default_factory=dict)
    backends: dict[str, str] = field(default_factory=dict)
    fell_back: dict[str, str] = field(default_factory=dict)  # module name -> reason
    sources: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, Timing] = field(default_factory=dict)  # never_slower: kernel vs torch op
    untimed: dict[str, str] = field(default_factory=dict)     # never_slower could not time: module -> reason

    @property
    def replaced(self) -> dict[str, Timing]:
        """Ops whose torch op was faster than their kernel (never_slower)."""
        return {k: t for k, t in self.timings.items() if t.choice == TORCH_CHOICE}

    def summary(self) -> str:
        kinds = sorted({b.split(" ", 1)[0] for b in self.backends.values()})
        msg = f"{len(self.attached)} kernels attached ({', '.join(kinds) or 'none'})"
        if self.timings:
            msg += f", {len(self.timings)} timed against torch, {len(self.replaced)} kept torch (faster)"
        return msg + (f", {len(self.fell_back)} fell back" if self.fell_back else "")


def lowered_ops(gm: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (n, m) for n, m in gm.named_modules() if isinstance(m, (LowbitLinear, LowbitConv, FusedAttention))
    ]


def _try(op, target, cache_dir):
    try:
        return compile_op(op, target, cache_dir), None
    except (UnsupportedOp, BuildError) as e:
        return None, str(e)


def _use_torch(name: str, op, report: AttachReport, label: str | None = None, fb=None) -> None:
    """Put the torch op in place of the kernel (recorded choice or a measured one)."""
    if fb is None:  # a recorded choice (or attention, whose torch path needs nothing): build it here
        fb, torch_name = fallback_for(op)
    else:
        torch_name = fb.name
    op.kernel, op.backend = fb, f"{torch_name} ({label or 'recorded choice: faster than its kernel'})"
    op.kernel_choice = TORCH_CHOICE
    report.attached.pop(name, None)
    report.backends[name] = op.backend


def _compile(name, op, t, fallback, cache_dir, report):
    """Compile op's kernel for target t (portable / reference fallbacks when allowed); None if none."""
    if not fallback:
        return compile_op(op, t, cache_dir), t.name
    kernel, err = _try(op, t, cache_dir)
    used = t.name
    if kernel is None and t.name != "portable":
        kernel, err2 = _try(op, "portable", cache_dir)
        used, err = "portable", (f"{err}; portable used instead" if kernel else f"{err}; {err2}")
    if kernel is None:
        warnings.warn(f"codegen: {name} stays on the reference path: {err}")
        report.fell_back[name] = err or ""
        return None, used
    if err:
        report.fell_back[name] = err
    return kernel, used


def _time_against_torch(gm, report: AttachReport, example_inputs, budget_s: float) -> None:
    """never_slower: time every attached kernel against its torch op on its inputs from example_inputs."""
    ops = dict(lowered_ops(gm))
    names = {n for n in report.attached if n in ops}
    try:
        inputs = capture_op_inputs(gm, tuple(example_inputs), names)
    except Exception as e:  # the graph cannot run these inputs here: keep the kernels, say why
        report.untimed.update({n: f"example inputs do not run: {type(e).__name__}: {e}" for n in names})
        return
    for name in sorted(names):
        op = ops[name]
        if name not in inputs:
            report.untimed[name] = "not called by the example inputs"
            continue
        args, kwargs = inputs[name]
        if not kernel_serves(op, args):
            report.untimed[name] = "the example inputs do not use the kernel (e.g. too many query rows)"
            continue
        try:
            timing, fb, torch_name = decide(op, op.kernel, args, kwargs, budget_s)
        except Exception as e:
            report.untimed[name] = f"timing failed: {type(e).__name__}: {e}"
            continue
        report.timings[name] = timing
        if timing.choice == TORCH_CHOICE:
            _use_torch(name, op, report, timing.label(torch_name), fb)
            continue
        op.backend = report.backends[name] = f"{op.backend} ({timing.label(torch_name)})"
        if "kernel_choice" in vars(op):
            del op.kernel_choice


def attach_kernels(
    gm: torch.nn.Module,
    target: str = "native",
    fallback: bool = False,
    out_dir: str | Path | None = None,
    cache_dir: str | None = None,
    never_slower: bool = False,
    example_inputs: tuple | None = None,
    timing_budget_s: float = 0.03,
) -> AttachReport:
    """Compile and attach a kernel to each lowered op (op.kernel, op.backend = "c:<target>").

    target="reference" detaches all kernels.  With fallback=True an op the target cannot serve
    gets the portable kernel instead (or stays on the reference path, with a warning); with
    fallback=False the UnsupportedOp / BuildError is raised.  Sources go to out_dir/<module>.c.
    never_slower=True times each kernel against the torch op it replaces on the inputs the op receives
    from `example_inputs` (at most ~timing_budget_s per op) and keeps the faster; otherwise an op whose
    recorded choice (op.kernel_choice) is the torch op gets it back untimed.
    """
    report = AttachReport()
    if target == "reference":
        for name, op in lowered_ops(gm) + _embeddings(gm):
            op.kernel, op.backend = None, "reference"
            report.backends[name] = "reference"
        return report
    t = resolve_target(target)
    ops = lowered_ops(gm)
    wanted = [(name, op) for name, op in ops
              if never_slower or getattr(op, "kernel_choice", None) != TORCH_CHOICE]
    with ThreadPoolExecutor(max_workers=min(BUILD_WORKERS, max(1, len(wanted)))) as pool:
        builds = {name: pool.submit(_compile, name, op, t, fallback, cache_dir, report)
                  for name, op in wanted}
        for name, op in ops:
            if name not in builds:
                _use_torch(name, op, report)
                continue
            _attach_one(name, op, *builds[name].result(), report, out_dir)
    _attach_embeddings(gm, t, fallback, cache_dir, report)  # after the linears (may re-home shared codes)
    if never_slower and example_inputs:
        _time_against_torch(gm, report, example_inputs, timing_budget_s)
    return report


def _embeddings(gm: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, LowbitEmbedding)]


def _attach_embeddings(gm, t, fallback: bool, cache_dir, report: AttachReport) -> None:
    """Every LowbitEmbedding the row kernel can serve gets it (one C function per target, shared)."""
    ops = _embeddings(gm)
    if not ops:
        return
    try:
        rows = embedding_rows(t, cache_dir)
    except (UnsupportedOp, BuildError) as exc:
        if not fallback:
            raise
        rows, why = None, str(exc)
    for name, op in ops:
        reason = why if rows is None else serves(op)
        if reason is None:
            op.kernel, op.backend = rows, f"c:{t.name}"
            report.attached[name], report.backends[name] = rows.name, op.backend
        else:
            op.kernel, op.backend = None, "reference"
            report.backends[name], report.fell_back[name] = "reference", reason


def _attach_one(name: str, op, kernel, used: str, report: AttachReport, out_dir) -> None:
    """Put a built kernel (or the reference path when none was built) on the op, in graph order."""
    if kernel is None:
        op.kernel, op.backend = None, "reference"
        report.backends[name] = "reference"
        return
    op.kernel, op.backend = kernel, f"c:{used}"
    report.attached[name], report.backends[name] = kernel.name, op.backend
    if out_dir is not None:
        path = Path(out_dir) / f"{name.replace('.', '_') or 'root'}.c"
        atomic_write(path, kernel.source)
        report.sources[name] = path
