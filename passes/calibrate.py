"""calibrate (analysis): run the graph on calibration inputs and record activation statistics.

For every quantizable node, meta[ir.ACT_STATS] gets the statistics of its *input* activation:
    min, max, absmax (floats), percentile (of |x|, `pct` e.g. 99.99, from a bounded 2048-bin histogram),
    channel_absmax (tensor [C_in]), rows (number of input rows seen), batches,
    hdiag (float64 [K], E[x_k^2]) and H (float64 [K, K], E[x x^T] over rows; None when
    K > max_h_dim, for grouped convs, or with option full_h=False), where rows are the vectors the
    flattened weight multiplies (im2col patches for convs). H is accumulated, never the activations,
    so memory is O(K^2) per node.
Placeholders and the nodes feeding the output get min/max/absmax/percentile of their *output* in
CalibrationData.io_stats[placeholder name or "output:<i>"] (also in meta[ACT_STATS] when the node has
no input stats): for io q/dq. CalibrationData.samples[node.name] keeps a small slice of the first
batch's input (for quantize's SQNR). Provides: CalibrationData (fxquant.analysis).

Inputs: ctx.calibration (a list of input tuples; a bare tensor item is wrapped), or the example
inputs when None; an empty list raises ConfigError. A progress bar goes to stderr when ctx.progress.

Example:
    >>> import torch, fxquant.tracing as c
    >>> from fxquant.registry import PassContext
    >>> gm = c.capture(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    >>> _ = calibrate(gm, PassContext(example_inputs=(torch.randn(3, 4),), options=CalibrateOptions()))
    >>> [n.meta["fxq_act_stats"]["H"].shape for n in gm.graph.nodes if n.op == "call_function"]
    [torch.Size([4, 4])]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.analysis import CalibrationData
from fxquant.progress import Progress
from fxquant.quantizers import nodes as qn
from fxquant.registry import PassResult, calibration_batches, register_pass  # noqa: F401 (re-exported)


@dataclass
class CalibrateOptions:
    max_batches: int = 0          # 0 = use every calibration item
    percentile: float = 99.99     # percentile of |x| recorded (for static activation scales)
    max_h_dim: int = 4096         # above this K only diag(H) is kept
    full_h: bool = True           # False: only diag(H), when nothing reads H (GPTQ rounding and
    # awq-scale do); calibrating Whisper tiny.en's encoder on 8 windows: 4.0-4.4 s with H, 2.5-2.8 s without
    sample_numel: int = 1 << 18   # elements of the first batch's input kept per node for SQNR checks


class RangeObserver:
    """min / max / absmax and a bounded histogram of |x| whose range doubles (merging bins) as needed."""

    def __init__(self, bins: int = 2048):
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.top = 0.0
        self.min, self.max = math.inf, -math.inf

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if not bool(torch.isfinite(x).all()):
            x = x[torch.isfinite(x)]  # -inf entries of additive attention masks carry no range
        if x.numel() == 0:
            return
        self.min = min(self.min, x.min().item())
        self.max = max(self.max, x.max().item())
        a = x.abs().reshape(-1)
        amax = a.max().item()
        if self.top == 0.0:
            self.top = amax if amax > 0 else 1e-12
        while amax > self.top:  # double the range: bin pairs merge
            self.hist = torch.cat(
                [self.hist.view(-1, 2).sum(1), torch.zeros(self.bins // 2, dtype=torch.float64)]
            )
            self.top *= 2
        idx = (a / self.top * self.bins).long().clamp(max=self.bins - 1)
        self.hist += torch.bincount(idx, minlength=self.bins).double()

    def percentile(self, pct: float) -> float:
        total = self.hist.sum().item()
        if total == 0:
            return 0.0
        cdf = self.hist.cumsum(0) / total
        i = int(
            torch.searchsorted(cdf, torch.tensor(pct / 100.0, dtype=torch.float64)).clamp(max=self.bins - 1)
        )
        return min((i + 1) * self.top / self.bins, max(abs(self.min), abs(self.max)))

    def stats(self, pct: float) -> dict:
        return {
            "min": self.min,
            "max": self.max,
            "absmax": max(abs(self.min), abs(self.max)),
            "percentile": self.percentile(pct),
            "pct": pct,
        }


class NodeObserver(RangeObserver):
    """RangeObserver plus per-channel absmax and the running second moments of the weight's input rows."""

    def __init__(self, node: fx.Node, weight: torch.Tensor, max_h_dim: int, full_h: bool = True):
        super().__init__()
        self.node, self.weight = node, weight
        self.k = weight[0].numel()
        grouped = node.target not in ir.LINEAR_TARGETS and qn.conv_args(node)[3] > 1
        self.want_h = full_h and self.k <= max_h_dim and not grouped
        self.h = torch.zeros(self.k, self.k, dtype=torch.float64) if self.want_h else None
        self.hdiag = torch.zeros(self.k, dtype=torch.float64)
        self.rows = 0
        self.batches = 0
        self.channel_absmax = None

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        dim = -1 if self.node.target in ir.LINEAR_TARGETS else 1
        ch = x.detach().abs().float().transpose(dim, -1).reshape(-1, x.shape[dim]).amax(0)
        self.channel_absmax = ch if self.channel_absmax is None else torch.maximum(self.channel_absmax, ch)
        rows = qn.input_rows(self.node, x.detach(), self.weight).float()
        if self.want_h:   # float32 GEMMs (float64 ones took ~10 s of a Whisper compile), summed in float64
            self.h += (rows.T @ rows).double()
        self.hdiag += rows.pow(2).sum(0).double()
        self.rows += rows.shape[0]
        self.batches += 1

    def stats(self, pct: float) -> dict:
        out = super().stats(pct)
        n = max(self.rows, 1)
        out.update(
            channel_absmax=self.channel_absmax,
            rows=self.rows,
            batches=self.batches,
            hdiag=self.hdiag / n,
            H=None if self.h is None else self.h / n,
        )
        return out


class _Recorder(fx.Interpreter):
    def __init__(self, gm, observers, io_observers, samples, sample_numel):
        super().__init__(gm)
        self.observers, self.io_observers = observers, io_observers
        self.samples, self.sample_numel = samples, sample_numel

    def run_node(self, n: fx.Node):
        if n.name in self.observers:
            x = self.fetch_args_kwargs_from_env(n)[0][0]
            self.observers[n.name].update(x)
            if n.name not in self.samples:
                keep = max(1, self.sample_numel // max(1, x[0].numel())) if x.dim() > 1 else x.shape[0]
                self.samples[n.name] = x[:keep].detach().clone()
        out = super().run_node(n)
        if n.name in self.io_observers and isinstance(out, torch.Tensor) and out.is_floating_point():
            self.io_observers[n.name].update(out)
        return out


@register_pass("calibrate", options=CalibrateOptions, kind="analysis", provides=(CalibrationData,))
def calibrate(gm: fx.GraphModule, ctx) -> PassResult:
    """Collect input activation stats and second moments H of every quantizable node."""
    opts = ctx.options or CalibrateOptions()
    batches = calibration_batches(ctx, opts.max_batches)
    observers = {}
    for node in gm.graph.nodes:
        if ir.is_quantizable(node):
            observers[node.name] = NodeObserver(node, ir.node_weight(gm, node), opts.max_h_dim, opts.full_h)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    io_nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    io_nodes += [a for a in out_node.all_input_nodes]
    io_observers = {n.name: RangeObserver() for n in io_nodes}
    data = CalibrationData(batches=len(batches))
    samples = data.samples
    recorder = _Recorder(gm, observers, io_observers, samples, opts.sample_numel)
    bar = Progress("calibrate", len(batches), bool(ctx.progress))
    with torch.no_grad():
        for i, inputs in enumerate(batches, start=1):
            recorder.run(*inputs)
            bar.step(i)
    by_name = {n.name: n for n in gm.graph.nodes}
    for name, obs in observers.items():
        by_name[name].meta[ir.ACT_STATS] = obs.stats(opts.percentile)
    io_stats = data.io_stats
    outputs = {n.name: f"output:{i}" for i, n in enumerate(out_node.all_input_nodes)}
    for name, obs in io_observers.items():
        if obs.hist.sum() > 0:
            stats = obs.stats(opts.percentile)
            io_stats[outputs.get(name, name)] = stats
            by_name[name].meta.setdefault(ir.ACT_STATS, stats)
    ctx.analyses.set(data)
    return PassResult(changed=False, message=f"{len(observers)} nodes observed on {len(batches)} batches")
