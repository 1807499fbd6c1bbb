"""Per-node timing of a compiled graph: where the time goes (kernels, torch ops, glue), and peak memory.

Example:
    >>> print(cm.report(profile=True))            # doctest: +SKIP
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import torch
import torch.fx as fx
from tabulate import tabulate

from . import ir
from .graphutil import flat_inputs
from .ops import LoweredOp


class _TimedInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, times: dict[str, list[float]]):
        super().__init__(gm)
        self.times = times

    def run_node(self, n: fx.Node) -> Any:
        start = time.perf_counter()
        out = super().run_node(n)
        if n.op in ("call_function", "call_module", "call_method"):
            self.times.setdefault(n.name, []).append(time.perf_counter() - start)
        return out


def _timed_forward(gm: fx.GraphModule, inputs: tuple) -> tuple[float, float]:
    """(total, time inside low-bit ops) of one call of the real generated forward."""
    inside = [0.0]

    def pre(_mod, _args):
        inside.append(time.perf_counter())

    def post(_mod, _args, _out):
        inside[0] += time.perf_counter() - inside.pop()

    hooks = []
    for mod in gm.modules():
        if isinstance(mod, LoweredOp):
            hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        start = time.perf_counter()
        gm(*inputs)
        total = time.perf_counter() - start
    finally:
        for h in hooks:
            h.remove()
    return total, inside[0]


def profile(gm: fx.GraphModule, inputs: tuple, repeat: int = 5) -> dict[str, Any]:
    """Median times of the real generated forward (total and inside low-bit ops), plus per-node
    medians from an fx.Interpreter run (for ranking nodes; it adds its own per-node overhead)."""
    times: dict[str, list[float]] = {}
    with torch.no_grad():
        gm(*inputs)  # warm-up (kernel loading, caches)
        real = [_timed_forward(gm, inputs) for _ in range(repeat)]
        flat = flat_inputs(gm, inputs)
        for _ in range(repeat):
            _TimedInterpreter(gm, times).run(*flat)
    nodes = {n.name: n for n in gm.graph.nodes}
    rows = []
    for name, ts in times.items():
        node = nodes[name]
        lowered = node.op == "call_module" and isinstance(gm.get_submodule(node.target), LoweredOp)
        kind = "kernel" if lowered else "torch"
        if node.op == "call_module" and node.target == "_guards_fn":
            kind = "guard"
        rows.append(
            {
                "node": name,
                "module": node.meta.get(ir.MODULE, ""),
                "kind": kind,
                "backend": getattr(gm.get_submodule(node.target), "backend", "")
                if node.op == "call_module"
                else "",
                "ms": 1e3 * statistics.median(ts),
            }
        )
    rows.sort(key=lambda r: -r["ms"])
    real_ms = 1e3 * statistics.median(t for t, _ in real)
    kernel_ms = 1e3 * statistics.median(k for _, k in real)
    torch_ms = sum(r["ms"] for r in rows if r["kind"] != "kernel")  # interpreter timing of the other ops
    return {
        "rows": rows,
        "forward_ms": real_ms,
        "kernel_ms": kernel_ms,
        "torch_ms": torch_ms,
        "outside_kernels_ms": real_ms - kernel_ms,
        "glue_ms": max(0.0, real_ms - kernel_ms - torch_ms),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def render_profile(prof: dict[str, Any], top: int = 15) -> str:
    body = [[r["node"], r["module"], r["kind"], r["backend"], f"{r['ms']:.3f}"] for r in prof["rows"][:top]]
    text = tabulate(body, headers=["node", "module", "kind", "backend", "median ms"], tablefmt="simple")
    return (
        f"{text}\n\nforward {prof['forward_ms']:.2f} ms (median): inside low-bit kernels "
        f"{prof['kernel_ms']:.2f} ms, outside them {prof['outside_kernels_ms']:.2f} ms (other torch ops "
        f"{prof['torch_ms']:.2f} ms when timed one by one, glue between nodes {prof['glue_ms']:.2f} ms); "
        f"peak RSS of this process {prof['peak_rss_mib']:.0f} MiB"
    )
