"""Compiled kernels as Python callables, and `compile_op` which builds one for a lowered op.

Example:
    >>> import torch
    >>> from fxquant.ops import LowbitLinear
    >>> from fxquant.qweight import QuantizedWeight
    >>> op = LowbitLinear(QuantizedWeight.uniform_symmetric(torch.randn(13, 70), 4, 32), bias=None)
    >>> k = compile_op(op, target="portable")                        # doctest: +SKIP
    >>> x = torch.randn(3, 70)
    >>> torch.allclose(k(x), op.reference(x), rtol=1e-5, atol=1e-5)  # doctest: +SKIP
    True
"""
from __future__ import annotations

import ctypes
from typing import Callable

import torch
import torch.nn.functional as F

from fxquant.ops import FusedAttention, LowbitConv, LowbitLinear
from fxquant.graphutil import conv_output_size
from fxquant.qweight import QuantizedWeight, dequantize

from .threadpool import load_kernel_library, num_threads
from .kernel_table import kernel_for, pack_lut_avx512
from .pack_cache import cached_codes
from .packing import Packed, analyze_tables, pack_avx512, pack_avx512_codes
from .render import UnsupportedOp, render_conv_grouped, render_linear
from .kernel_base import _Kernel
from .targets import Target, resolve_target

_VP, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class LinearKernel(_Kernel):
    """y = kernel(x) for x [..., K] (any float dtype); output keeps x's dtype."""

    def __init__(self, name: str, target: Target, source: str, lib: ctypes.CDLL, n: int, k: int,
                 packed: Packed, bias: torch.Tensor | None, act_scale: torch.Tensor | None = None,
                 ln: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None), residual: bool = False):
        super().__init__(name, target, source)
        self.n, self.k, self.lib, self.packed, self.bias = n, k, lib, packed, bias
        self.packed_codes = packed.packed_codes  # every code: the op keeps this copy instead of its own
        self.act_scale = act_scale  # static (calibrated) activation scale; None = dynamic per row
        self.supports_static_act = act_scale is not None
        self.ln, self.residual = ln, residual  # fused LayerNorm (weight, bias) and residual add
        self._fn = lib.fx_linear
        self._fn.argtypes = [_VP, _I64, _VP, _INT, _VP, _VP]
        self._fn.restype = None
        # self.packed / self.bias / self.ln keep the blobs alive: the C side only receives this pointer array
        self._blobs = (_VP * 9)(*[_ptr(t) for t in packed.tensors()], _ptr(bias), _ptr(act_scale),
                                _ptr(ln[0]), _ptr(ln[1]))
        self._blobs_ptr = ctypes.addressof(self._blobs)

    def with_weights(self, packed: Packed) -> "LinearKernel":
        """Same compiled code, other packed weights of the same layout (e.g. benchmark copies)."""
        return LinearKernel(self.name, self.target, self.source, self.lib, self.n, self.k, packed, self.bias,
                            self.act_scale, self.ln, self.residual)

    def _residual_ptr(self, residual: torch.Tensor | None, shape) -> int | None:
        if not self.residual:
            if residual is not None:
                raise ValueError(f"{self.name}: this kernel has no fused residual add")
            return None
        want = tuple(shape[:-1]) + (self.n,)
        if residual is None or tuple(residual.shape) != want or residual.dtype != torch.float32 \
                or not residual.is_contiguous():
            raise ValueError(f"{self.name}: needs a contiguous float32 residual of shape {want}, got "
                             f"{None if residual is None else (tuple(residual.shape), residual.dtype)}")
        return residual.data_ptr()

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed.tensors() if t is not None)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """out: optional preallocated contiguous fp32 [M, N] (saves an allocation per call);
        residual: the [..., N] tensor a kernel with a fused residual add adds to its output."""
        if not self.runnable:
            self._check()
        shape = x.shape
        res = self._residual_ptr(residual, shape) if (self.residual or residual is not None) else None
        if out is None and x.dtype == torch.float32 and shape[-1] == self.k and x.is_contiguous():
            # fast path (decode loops call this hundreds of times per token): no reshapes or copies
            y = torch.empty(shape[:-1] + (self.n,), dtype=torch.float32)
            self._fn(x.data_ptr(), x.numel() // self.k, y.data_ptr(), num_threads(), self._blobs_ptr, res)
            return y
        if shape[-1] != self.k:
            raise ValueError(f"{self.name}: expected last dim {self.k}, got input of shape {tuple(shape)}")
        x2 = x if len(shape) == 2 else x.reshape(-1, self.k)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        m = x2.shape[0]
        if out is None:
            y = torch.empty((m, self.n), dtype=torch.float32)
        elif out.shape != (m, self.n) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"{self.name}: out must be a contiguous float32 [{m}, {self.n}] tensor")
        else:
            y = out
        self._fn(x2.data_ptr(), m, y.data_ptr(), num_threads(), self._blobs_ptr, res)
        if len(shape) != 2:
            y = y.view(*shape[:-1], self.n)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


class Im2colConvKernel(_Kernel):
    """groups=1 conv: im2col in torch (same unfold as the reference), then the linear kernel."""

    def __init__(self, op: LowbitConv, linear: LinearKernel):
        super().__init__(linear.name.replace("linear_", "conv_im2col_", 1), linear.target, linear.source)
        self.op, self.linear = op, linear
        self.packed_codes = linear.packed_codes
        self.supports_static_act = linear.supports_static_act

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        op = self.op
        if op.dims == 1 and op.dilation[0] == 1:
            return self._conv1d(x)
        if op.dims == 2:
            x4, ks = x, op.weight_shape[2:]
            stride, padding, dilation = tuple(op.stride), tuple(op.padding), tuple(op.dilation)
        else:
            x4, ks = x.unsqueeze(2), (1, op.weight_shape[2])
            stride, padding, dilation = (1, op.stride[0]), (0, op.padding[0]), (1, op.dilation[0])
        b, _, h, w = x4.shape
        if ks == (1, 1) and stride == (1, 1) and padding == (0, 0):
            oh, ow = h, w
            cols = x4.float().flatten(2).transpose(1, 2)
        else:
            cols = F.unfold(x4.float(), ks, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
            oh = conv_output_size(h, ks[0], stride[0], padding[0], dilation[0])
            ow = conv_output_size(w, ks[1], stride[1], padding[1], dilation[1])
        y = self.linear(cols.contiguous()).transpose(1, 2)  # [B, Cout, L]
        y = y.reshape(b, -1, oh, ow) if op.dims == 2 else y.reshape(b, -1, ow)
        return y.to(x.dtype)


    def _conv1d(self, x: torch.Tensor) -> torch.Tensor:
        """1-D, no dilation: the columns as one copy of a strided window view ([B, L, C*k], the weight's
        (channel, tap) order), then the linear kernel; its [B, L, Cout] output is returned as a [B, Cout, L]
        view (what the next conv or a transpose back to tokens reads)."""
        op = self.op
        (k,), (s,), (p,) = op.weight_shape[2:], op.stride, op.padding
        b, c = x.shape[0], x.shape[1]
        xp = F.pad(x.float(), (p, p)) if p else x.float()
        if xp.shape[2] < k:
            raise ValueError(f"{self.name}: input of {x.shape[2]} steps is shorter than the kernel ({k}, "
                             f"padding {p})")
        cols = xp.unfold(2, k, s).permute(0, 2, 1, 3).reshape(b, -1, c * k)
        return self.linear(cols).transpose(1, 2).to(x.dtype)


class GroupedConvKernel(_Kernel):
    """Grouped / depthwise conv with the weight dequantized offline (weight-only semantics)."""

    def __init__(self, name: str, target: Target, source: str, lib: ctypes.CDLL, op: LowbitConv):
        super().__init__(name, target, source)
        self.dims = op.dims
        self._w = dequantize(op.qweight).contiguous()
        self._b = None if op.bias is None else op.bias.float().contiguous()
        self._fn = lib.fx_conv
        self._fn.argtypes = [_VP, _I64, _I64, _I64, _VP, _INT, _VP, _VP]
        self._fn.restype = None
        self.cout = op.weight_shape[0]
        self.out_hw = _out_hw(op)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check()
        x4 = (x if self.dims == 2 else x.unsqueeze(2)).float().contiguous()
        b, _, h, w = x4.shape
        oh, ow = self.out_hw(h, w)
        y = torch.empty(b, self.cout, oh, ow, dtype=torch.float32)
        self._fn(x4.data_ptr(), b, h, w, y.data_ptr(), num_threads(), self._w.data_ptr(), _ptr(self._b))
        return (y if self.dims == 2 else y.squeeze(2)).to(x.dtype)


def _out_hw(op: LowbitConv) -> Callable[[int, int], tuple[int, int]]:
    ks = op.weight_shape[2:] if op.dims == 2 else (1, op.weight_shape[2])
    s = tuple(op.stride) if op.dims == 2 else (1, op.stride[0])
    p = tuple(op.padding) if op.dims == 2 else (0, op.padding[0])
    d = tuple(op.dilation) if op.dims == 2 else (1, op.dilation[0])
    return lambda h, w: (conv_output_size(h, ks[0], s[0], p[0], d[0]),
                         conv_output_size(w, ks[1], s[1], p[1], d[1]))


def build_linear(op, target: Target, cache_dir: str | None = None) -> LinearKernel:
    """Render, pack, compile and wrap the linear kernel of a LowbitLinear (or im2col conv) op.

    The avx512 LUT kernels' code stream comes from codegen/pack_cache.py when the op's bit-packed codes were
    packed before (a loaded artifact): the codes are then never unpacked here."""
    family = target.family
    entry = kernel_for(op.scheme, family if op.act_bits == 8 else "f32")
    stream = None
    if entry.pack is pack_lut_avx512:
        n, k = op.code_shape
        stream = cached_codes(op.packed_codes, op.group_size,
                              lambda: pack_avx512_codes(op.codes, op.bits, op.group_size), cache_dir)
        # the codes' shape is all rendering and packing read of them now: a zero-stride stand-in
        shape_only = torch.zeros((), dtype=torch.uint8).expand(n, k)
        qw = QuantizedWeight(op.bits, shape_only, op.table, op.table_index, op.scales, op.group_size,
                             op.scheme, op.granularity)
    else:
        qw = op.qweight
    info = analyze_tables(qw) if family == "avx512" and op.act_bits == 8 else None
    ln_eps, residual = getattr(op, "ln_eps", None), bool(getattr(op, "residual", False))
    name, src = render_linear(qw, family, op.bias is not None, op.epilogue, op.act_bits, target.name, info,
                              ln_eps=ln_eps, has_res=residual)
    packed = pack_avx512(qw, info, stream) if stream is not None else entry.pack(qw, info)
    lib = load_kernel_library(src, name, target.flags, cache_dir)
    n, k = qw.codes.shape
    bias = None if op.bias is None else op.bias.float().contiguous()
    act_scale = None
    if getattr(op, "act_mode", "dynamic") == "static" and op.act_bits == 8:
        act_scale = op.act_scale.detach().float().reshape(1).clone()  # calibrated per-tensor int8 scale
    ln = (None, None)
    if ln_eps is not None:
        ln = tuple(None if t is None else t.detach().float().contiguous() for t in (op.ln_weight, op.ln_bias))
    return LinearKernel(name, target, src, lib, n, k, packed, bias, act_scale, ln, residual)


def compile_op(op, target: str | Target = "native", cache_dir: str | None = None) -> Callable:
    """Build the kernel for a LowbitLinear / LowbitConv; returns a callable x -> y.

    Raises UnsupportedOp when the target has no kernel for the op's format and BuildError when
    the C compiler is missing or fails.
    """
    t = resolve_target(target) if not (isinstance(target, str) and target == "reference") else None
    if t is None:
        raise UnsupportedOp("target 'reference' has no compiled kernel: keep op.kernel = None")
    if isinstance(op, LowbitConv):
        if op.groups == 1:
            return Im2colConvKernel(op, build_linear(op, t, cache_dir))
        name = f"conv_{t.name}_g{op.groups}_w{op.bits}"
        src = render_conv_grouped(name, op.qweight, op.weight_shape, op.stride, op.padding, op.dilation,
                                  op.groups, op.bias is not None, op.epilogue)
        return GroupedConvKernel(name, t, src, load_kernel_library(src, name, t.flags, cache_dir), op)
    if isinstance(op, LowbitLinear):
        return build_linear(op, t, cache_dir)
    if isinstance(op, FusedAttention):
        from .attention import attention_kernel

        kw = {"kv_dtype": "int8"} if op.kv_int8 else {}
        return attention_kernel(op.head_dim, t, cache_dir=cache_dir, **kw)
    raise UnsupportedOp(f"compile_op expects a LowbitLinear, LowbitConv or FusedAttention, "
                        f"got {type(op).__name__}")
