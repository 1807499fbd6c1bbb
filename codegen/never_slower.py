"""Never slower than the float model: time each lowered op's kernel against the torch op it replaces.

At compile time (codegen pass, `never_slower=true`, the default) every lowered op is called on the inputs it
receives when the graph runs the example inputs: once with its generated kernel, once with torch's fp32 op,
interleaved, and the faster one is kept. Both run as a compiled module runs them (CompiledModule.forward,
threadpool.pool_owns_threads): the kernel at the current thread count (`torch.get_num_threads()`), the torch
op on one thread (measured on Whisper tiny.en's stem conv: chosen at 2 threads, 3.15 ms beat the kernel's
3.82 ms, but it ran on one thread in the compiled encoder, 8.8 ms).

- LowbitLinear / LowbitConv fall back to `Float32Fallback`: F.linear / F.conv on the op's *dequantized*
  weights (`fxquant.qweight.dequantize`, the reference path's own dequantization), so the weights keep the
  quantized accuracy; activations stay float. It costs the fp32 weight bytes of that op.
- FusedAttention falls back to its reference path (torch SDPA).

The choice is recorded on the op: `op.kernel_choice = "torch"` (stored in artifacts, honoured when a model is
loaded or re-attached) and `op.backend`, e.g. "torch-fp32 (kernel 5.3 ms > fp32 1.1 ms)"; a kernel that stays
shows its timings too, e.g. "c:avx512 (kernel 0.12 ms <= fp32 0.51 ms)". The kernel must be
slower by more than `rel_margin` and `abs_margin_ms` to be replaced (timings on a shared machine are
noisy, and a few microseconds are not worth 4x the weight bytes).

Example:
    >>> import torch
    >>> from fxquant.ops import LowbitLinear
    >>> from fxquant.qweight import QuantizedWeight
    >>> op = LowbitLinear(QuantizedWeight.uniform_symmetric(torch.randn(8, 16), 4), bias=None)
    >>> fb = Float32Fallback(op)
    >>> fb(torch.randn(2, 16)).shape
    torch.Size([2, 8])
    >>> slower_kernel(kernel_ms=5.3, fp32_ms=1.1)
    True
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx

from fxquant.ops import EPILOGUES, FusedAttention, LowbitConv, LowbitLinear
from fxquant.qweight import dequantize

from .threadpool import pool_owns_threads

REL_MARGIN = 1.10  # the kernel must take > 1.1x the fp32 op ...
ABS_MARGIN_MS = 0.005  # ... and > 5 us more per call to be replaced
TORCH_CHOICE = "torch"


class Float32Fallback:
    """y = torch fp32 op on the op's dequantized weights (+ the op's fused LayerNorm, epilogue, residual).

    Called like the op's kernel: fallback(x) or fallback(x, residual=r) for a LowbitLinear, fallback(x) for a
    LowbitConv."""

    name = "torch-fp32"

    def __init__(self, op: LowbitLinear | LowbitConv, timing_only: bool = False):
        """timing_only: zero weights of the same shape instead of dequantizing (an fp32 op costs the same
        whatever its values; never_slower dequantizes only the ops it hands to torch)."""
        if not isinstance(op, (LowbitLinear, LowbitConv)):
            raise TypeError(f"Float32Fallback serves LowbitLinear / LowbitConv, got {type(op).__name__}")
        w = torch.zeros(_code_shape(op)) if timing_only else dequantize(op.qweight)
        self.conv = isinstance(op, LowbitConv)
        if self.conv:
            w = w.view(op.weight_shape)
            self.dims, self.stride, self.padding = op.dims, op.stride, op.padding
            self.dilation, self.groups = op.dilation, op.groups
        self.weight = w.contiguous()
        self.bias = None if op.bias is None else op.bias.detach().float()
        self.epilogue = EPILOGUES.get(op.epilogue) if op.epilogue else None
        self.ln_eps = getattr(op, "ln_eps", None)
        self.ln = (
            (getattr(op, "ln_weight", None), getattr(op, "ln_bias", None))
            if self.ln_eps is not None
            else None
        )
        self.residual = bool(getattr(op, "residual", False))

    def weight_bytes(self) -> int:
        return self.weight.numel() * 4

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        h = x.float()
        if self.conv:
            conv = F.conv1d if self.dims == 1 else F.conv2d
            y = conv(h, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            if self.ln is not None:
                h = F.layer_norm(h, (h.shape[-1],), self.ln[0], self.ln[1], self.ln_eps)
            y = F.linear(h, self.weight, self.bias)
        if self.epilogue is not None:
            y = self.epilogue(y)
        if residual is not None:
            y = y + residual.float()
        return y.to(x.dtype)

    def __repr__(self) -> str:
        return f"<Float32Fallback {tuple(self.weight.shape)}>"

    def __deepcopy__(self, memo) -> "Float32Fallback":
        return self  # immutable, like the compiled kernels


def _code_shape(op) -> tuple[int, int]:
    shape = getattr(op, "code_shape", None)  # without unpacking the codes, where the op can tell
    return tuple(shape) if shape is not None else tuple(op.codes.shape)


def slower_kernel(
    kernel_ms: float, fp32_ms: float, rel_margin: float = REL_MARGIN, abs_margin_ms: float = ABS_MARGIN_MS
) -> bool:
    """True when the kernel is clearly slower than the fp32 op (both margins exceeded)."""
    return kernel_ms > fp32_ms * rel_margin and kernel_ms - fp32_ms > abs_margin_ms


@dataclass
class Timing:
    """Median ms per call of the kernel and of the torch op, and what was kept."""

    kernel_ms: float
    torch_ms: float
    choice: str  # "kernel" or "torch"

    def label(self, torch_name: str) -> str:
        """e.g. 'kernel 5.3 ms > fp32 1.1 ms' (torch_name 'torch-fp32')."""
        op = "<=" if self.kernel_ms <= self.torch_ms else ">"
        short = torch_name.split("-", 1)[-1]
        return f"kernel {self.kernel_ms:.3g} ms {op} {short} {self.torch_ms:.3g} ms"


def fallback_for(op, timing_only: bool = False) -> tuple[Any, str]:
    """(the callable to put in op.kernel when the torch op wins, backend name); timing_only: a stand-in that
    costs the same (see Float32Fallback)."""
    if isinstance(op, FusedAttention):
        return None, "torch-sdpa"
    return Float32Fallback(op, timing_only), "torch-fp32"


def capture_op_inputs(gm: torch.nn.Module, example_inputs: tuple, names: set[str]) -> dict[str, tuple]:
    """{module name: (args, kwargs)} of the first call each named op receives when gm runs example_inputs."""
    seen: dict[str, tuple] = {}
    if not isinstance(gm, fx.GraphModule) or not example_inputs:
        return seen

    class _Capture(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            if target in names and target not in seen:
                seen[target] = (tuple(args), dict(kwargs))
            return super().call_module(target, args, kwargs)

    from fxquant.graphutil import flat_inputs

    with torch.inference_mode():
        _Capture(gm).run(*flat_inputs(gm, tuple(example_inputs)))
    return seen


def time_pair(
    first: Callable[[], Any],
    second: Callable[[], Any],
    budget_s: float = 0.03,
    min_reps: int = 3,
    max_reps: int = 25,
    clear_ratio: float = 2.0,
) -> tuple[float, float]:
    """Median ms of two callables timed alternately (load from other processes hits both alike). Runs at
    least min_reps pairs (one preempted call must not decide: a compile of Whisper tiny.en on a loaded machine
    once handed two decode attention ops to torch after a single pair), then stops once one is clearly
    (clear_ratio x) faster or budget_s has passed, or after max_reps pairs."""
    first(), second()  # warm-up
    a, b = [], []
    clock = time.perf_counter
    start = clock()
    for i in range(max_reps):
        for fn, out in ((first, a), (second, b)) if i % 2 == 0 else ((second, b), (first, a)):
            t0 = clock()
            fn()
            out.append(clock() - t0)
        ma, mb = statistics.median(a), statistics.median(b)
        if i + 1 >= min_reps and (max(ma, mb) > clear_ratio * min(ma, mb) or clock() - start > budget_s):
            break
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


def _caller(op, impl, args: tuple, kwargs: dict) -> Callable[[], Any]:
    """A call of op's forward with `impl` as its kernel. Linear / conv ops call impl directly, as their
    forward does (so op.kernel, which may re-home the op's codes when set, is not touched); attention swaps
    op.kernel (impl None = its torch SDPA path)."""
    if isinstance(op, FusedAttention):

        def call():
            op.kernel = impl
            return op(*args, **kwargs)

        return call
    x = args[0]
    residual = args[1] if len(args) > 1 else kwargs.get("residual")
    if isinstance(op, LowbitLinear) and getattr(op, "residual", False) and residual is not None:
        r = residual.float().contiguous()
        return lambda: impl(x, residual=r)
    return lambda: impl(x)


def time_op(op, kernel, fallback, args: tuple, kwargs: dict, budget_s: float = 0.03) -> tuple[float, float]:
    """(kernel ms, torch ms) of the op's call on (args, kwargs) with its kernel and with the torch op
    (op.kernel as it was afterwards). Lowered ops never write their inputs, so the captured inputs are used
    as they are (and an attention op's int8 K / V memo from the capture run is reused)."""
    saved = op.kernel if isinstance(op, FusedAttention) else None
    try:
        with torch.inference_mode(), pool_owns_threads():
            return time_pair(_caller(op, kernel, args, kwargs), _caller(op, fallback, args, kwargs), budget_s)
    finally:
        if isinstance(op, FusedAttention):
            op.kernel = saved


def kernel_serves(op, args: tuple) -> bool:
    """False when op's forward would not call its kernel for these inputs (attention with more query rows
    than the kernel serves, or non-float32 queries): then there is nothing to time."""
    if isinstance(op, FusedAttention):
        q = args[0] if args else None
        return isinstance(q, torch.Tensor) and q.dtype == torch.float32 and q.shape[-2] <= op.max_query_rows
    return True


def decide(
    op,
    kernel,
    args: tuple,
    kwargs: dict,
    budget_s: float = 0.03,
    rel_margin: float = REL_MARGIN,
    abs_margin_ms: float = ABS_MARGIN_MS,
) -> tuple[Timing, Any, str]:
    """Time kernel vs torch op on (args, kwargs); (timing, the callable to attach if torch won (else None),
    torch backend name)."""
    twin, torch_name = fallback_for(op, timing_only=True)
    kernel_ms, torch_ms = time_op(op, kernel, twin, args, kwargs, budget_s)
    choice = TORCH_CHOICE if slower_kernel(kernel_ms, torch_ms, rel_margin, abs_margin_ms) else "kernel"
    fallback = fallback_for(op)[0] if choice == TORCH_CHOICE else None
    return Timing(kernel_ms, torch_ms, choice), fallback, torch_name
