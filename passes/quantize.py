"""quantize (analysis of weights; the graph is unchanged): pack every decided node's weight.

Requires PrecisionPlan (assign-precision); provides PackedWeights (fxquant.analysis).
For each quantizable node with a non-float meta[ir.DECISION]: a QuantizedWeight (fxquant.formats)
in PackedWeights.weights[node.name]; k-means / clip search weighted by the calibrated diag(H);
rounding "gptq" uses the calibrated H (nodes without H, i.e. grouped convs or K > max_h_dim, fall
back to nearest rounding, noted in provenance). meta[ir.QUANT_STATS] on every quantizable node:
    {"bytes": packed bytes, "fp32_bytes": 4 * params, "params": N*K, "sqnr_db": output SQNR of the
     lowered op (its exact reference semantics, incl. int8 activations) vs fp32 on a calibration
     sample (None without calibration)}.
Float nodes get bytes == fp32_bytes and sqnr_db inf.

Speed: each layer is a pure function of (weight, format, statistics) and the layers run in
`map_layers` (threads, one torch thread each); results go through the compile's shared
`quant_cache(ctx)`, so a format the sensitivity sweep already quantized is not quantized again.

Example:
    >>> import torch, fxquant.tracing as c
    >>> from fxquant.registry import PassContext
    >>> gm = c.capture(torch.nn.Linear(64, 8), (torch.randn(4, 64),))
    >>> from passes.calibrate import calibrate                        # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.analysis import CalibrationData, PackedWeights, PrecisionPlan
from fxquant.formats import sqnr_db
from fxquant.quant_cache import quant_cache
from fxquant.lowering import quant_args, make_op, quantize_node  # noqa: F401 (quantize_node re-exported)
from fxquant.qweight import QuantizedWeight
from fxquant.quantizers import nodes as qn
from fxquant.registry import PassResult, register_pass

PASS = "quantize"
T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with n torch intra-op threads (restored afterwards)."""
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)


def map_layers(fn: Callable[[T], R], items: list[T], workers: int | None = None) -> list[R]:
    """[fn(x) for x in items], spread over `workers` threads (default: torch's thread count), each
    running torch single-threaded.

    One layer per thread and no intra-op barriers: on a busy machine a preempted worker delays its
    own layer only, instead of stalling every element-wise op of every layer. fn must be a pure
    function of its item (results come back in order; exceptions propagate).
    """
    workers = max(1, min(len(items), workers or torch.get_num_threads(), os.cpu_count() or 1))
    with torch_threads(1):
        if workers == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(workers, thread_name_prefix="fxquant-quantize") as pool:
            return list(pool.map(fn, items))


def output_sqnr(gm: fx.GraphModule, node: fx.Node, qw: QuantizedWeight, x: torch.Tensor) -> float:
    """SQNR (dB) of the lowered op's output vs the fp32 op on input x."""
    w = ir.node_weight(gm, node)
    b = qn.bias_of(node)
    bias = ir.get_attr_value(gm, b.target) if isinstance(b, fx.Node) and b.op == "get_attr" else None
    with torch.no_grad():
        ref = qn.run_node(node, x.float(), w.float(), None if bias is None else bias.float())
        out = make_op(gm, node, qw)(x.float())
    return sqnr_db(ref, out)


@register_pass(PASS, kind="analysis", requires=(PrecisionPlan,), provides=(PackedWeights,))
def quantize(gm: fx.GraphModule, ctx) -> PassResult:
    """Compute QuantizedWeight + QUANT_STATS for every decided node (layers in parallel threads)."""
    ctx.analyses.get(PrecisionPlan, needed_by=PASS)
    calibration = ctx.analyses.cached(CalibrationData)        # optional: SQNR is None without it
    samples = calibration.samples if calibration is not None else {}
    qweights = ctx.analyses.set(PackedWeights()).weights
    cache = quant_cache(ctx)
    todo = []
    for node in gm.graph.nodes:
        d = node.meta.get(ir.DECISION)
        if ir.is_quantizable(node) and d is not None and d.weight_bits is not None:
            args, note = quant_args(gm, node)
            if note:
                ir.add_provenance(node, PASS, note)
            todo.append((node, args))

    def work(item: tuple[fx.Node, dict]) -> tuple[QuantizedWeight, float | None]:
        node, args = item
        qw = cache.quantize(**args)
        sample = samples.get(node.name)
        return qw, None if sample is None else output_sqnr(gm, node, qw, sample)

    done = dict(zip((n.name for n, _ in todo), map_layers(work, todo)))
    count, total, fp32 = 0, 0, 0
    for node in gm.graph.nodes:
        if not ir.is_quantizable(node):
            continue
        w = ir.node_weight(gm, node)
        stats = {"params": w.numel(), "fp32_bytes": 4 * w.numel()}
        if node.name not in done:
            stats.update(bytes=4 * w.numel(), sqnr_db=float("inf"))
        else:
            d = node.meta[ir.DECISION]
            qw, sqnr = done[node.name]
            qweights[node.name] = qw
            stats.update(bytes=qw.nbytes(), sqnr_db=sqnr)
            ir.add_provenance(node, PASS, f"{d.label()}: {qw.nbytes()} bytes"
                                          + (f", SQNR {sqnr:.1f} dB" if sqnr is not None else ""))
            count += 1
        node.meta[ir.QUANT_STATS] = stats
        total += stats["bytes"]
        fp32 += stats["fp32_bytes"]
    return PassResult(changed=False, message=f"{count} weights packed: {total} bytes ({fp32} fp32, "
                                             f"x{fp32 / max(total, 1):.2f})")
