"""Scaled-dot-product attention as a generated C kernel specialised on the head dim (decode and encoder shapes).

`attention_kernel(D, target)(q, k, v, mask, scale)` computes what
`torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)` does (no dropout,
not causal) for float32 [B, H, L, D] tensors, strided views included. Key/value rows whose mask entry is
-inf are never read, so a decode step over a mostly empty self-attention cache costs only its filled rows.
The result is a [B, H, Lq, D] view of a contiguous [B, Lq, H, D] buffer: merging heads is free.

With kv_dtype="int8", key / value are int8 [B, H, Lk, D] with float32 [B, H, Lk, 1] row scales (as made by
`fxquant.qweight.quantize_activation_per_row`), dequantized on the fly: a quarter of the bytes to read for
cross-attention K/V that stay fixed while decoding.

Prefill: an unmasked float32 call with at least PREFILL_MIN_ROWS query rows (an encoder's self-attention) runs
a flash-attention path on AVX512-BF16 dot products (templates/attention_prefill.c.j2; avx512 target, head dim a
multiple of 16, `has_prefill`): q * scale, k, v and the softmax weights rounded to bf16, sums in fp32, about
4x faster than torch's fp32 SDPA at T = 1500 and within ~2^-8 * max|v| of it (prefill_split=2 makes the
scores nearly exact for 1.5x the time).

Example:
    >>> import torch, torch.nn.functional as F
    >>> from fxquant.qweight import quantize_activation_per_row
    >>> q, kv = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
    >>> out = attention_kernel(head_dim=8, target="portable")(q, kv, kv)         # doctest: +SKIP
    >>> torch.allclose(out, F.scaled_dot_product_attention(q, kv, kv), atol=1e-6)  # doctest: +SKIP
    True
    >>> kq, ks = quantize_activation_per_row(kv)
    >>> k8 = attention_kernel(head_dim=8, target="portable", kv_dtype="int8")    # doctest: +SKIP
    >>> out8 = k8(q, kq, kq, key_scale=ks, value_scale=ks)                       # doctest: +SKIP
    >>> torch.allclose(out8, F.scaled_dot_product_attention(q, kq * ks, kq * ks), atol=1e-6)  # doctest: +SKIP
    True
    >>> enc = attention_kernel(64, "native")                                      # doctest: +SKIP
    >>> x = torch.randn(1, 6, 1500, 64)
    >>> err = (enc(x, x, x) - F.scaled_dot_product_attention(x, x, x)).abs().max()  # doctest: +SKIP
    >>> bool(err < 2 ** -8 * x.abs().max()) if enc.has_prefill else True         # doctest: +SKIP
    True
"""
from __future__ import annotations

import ctypes
import math
import struct
import threading
from functools import lru_cache

import torch

from .kernel_base import _Kernel
from .render import UnsupportedOp, render
from .targets import Target, resolve_target
from .threadpool import load_kernel_library, num_threads, wait_policy

# B*H*Lq*Lk*D multiply-adds below which one thread runs: waking a pool helper costs ~1-2 us while it still
# spins (threadpool.DEFAULT_SPIN_US after its last job) but tens of us once it sleeps (OMP_WAIT_POLICY=passive).
PAR_MIN_WORK = 1 << 18
PAR_MIN_WORK_PASSIVE = 1 << 20
# query rows from which an unmasked float32 call takes the bf16 prefill path (see AttentionKernel.has_prefill)
PREFILL_MIN_ROWS = 32
# q.k in the prefill path: 0 = bf16 q and k (default: its rounding is below the noise a quantized Whisper
# encoder adds anyway, see benchmarks/ATTENTION.md); 1 = q as bf16 hi + lo (1.25x time); 2 = q and k hi + lo,
# three products (1.5x time, scores nearly fp32; what is left is p and v rounded to bf16)
PREFILL_SPLITS = (0, 1, 2)
# B, H, Lq, Lk, strides (B, H, L, D) of q, k, v, mask strides (B, H, Lq), par_min; int8: + scale strides (B, H, L)
_DIMS = struct.Struct("20q")
_DIMS8 = struct.Struct("26q")
_NO_MASK = (0, 0, 0)
_VP, _INT = ctypes.c_void_p, ctypes.c_int
_F32, _I8 = torch.float32, torch.int8
KV_DTYPES = {"float32": _F32, "int8": _I8}


def render_attention(head_dim: int, target: Target, kv_dtype: str = "float32",
                     prefill_split: int = 0) -> tuple[str, str]:
    """(kernel name, C source), e.g. ("attention_avx512_d64", "...#define FX_D 64...");
    kv_dtype="int8" gives e.g. "attention_avx512_d64_kv8"."""
    kv8 = kv_dtype == "int8"
    name = f"attention_{target.name}_d{head_dim}" + ("_kv8" if kv8 else "")
    name += f"_s{prefill_split}" if prefill_split else ""
    return name, render("attention.c.j2", name=name, D=head_dim, family=target.family, kv8=kv8,
                        kv_t="int8_t" if kv8 else "float", pf_split=prefill_split)


class AttentionKernel(_Kernel):
    """out = kernel(q, key, value, mask=None, scale=None) for float32 4-D tensors, last dim = head_dim;
    with kv_dtype "int8": kernel(q, key_q, value_q, mask, scale, key_scale=ks, value_scale=vs)."""

    def __init__(self, name: str, target: Target, source: str, lib: ctypes.CDLL, head_dim: int,
                 kv_dtype: str = "float32"):
        super().__init__(name, target, source)
        self.head_dim, self.lib, self.kv_dtype = head_dim, lib, kv_dtype
        self._kv = KV_DTYPES[kv_dtype]
        self.default_scale = 1.0 / math.sqrt(head_dim)
        passive = wait_policy()[1] == 0
        self.par_min = PAR_MIN_WORK_PASSIVE if passive else PAR_MIN_WORK  # 0 = always split across threads
        self._fn = lib.fx_attention
        scales = [_VP, _VP] if self._kv is _I8 else []  # int8: key_scale, value_scale
        self._fn.argtypes = [_VP, _VP, _VP, _VP, _VP, _VP, _INT, ctypes.c_float, *scales]
        self._fn.restype = None
        self._tls = threading.local()  # per-thread dims buffer (ctypes releases the GIL during the call)
        self._prefill = None  # fx_attention_prefill: bf16 flash attention for many query rows, no mask
        if kv_dtype == "float32" and hasattr(lib, "fx_attention_prefill") and lib.fx_prefill_available():
            self._prefill = lib.fx_attention_prefill
            self._prefill.argtypes = [_VP, _VP, _VP, _VP, _VP, _INT, ctypes.c_float]
            self._prefill.restype = None
        self.prefill_min_rows = PREFILL_MIN_ROWS  # calls with at least this many query rows (and no mask) use it

    @property
    def quantize_rows(self):
        """int8 key / value kernels: the per-row quantizer that makes their inputs (codegen.kv_quant, the same
        target, built on first use); None for float32 ones. FusedAttention converts constant keys / values
        with it, bit for bit what its torch path (fxquant.kv_rows.kv_int8_per_row) gives."""
        if self._kv is not _I8:
            return None
        quant = self.__dict__.get("_quantizer")
        if quant is None:
            from .kv_quant import row_quantizer

            quant = self.__dict__["_quantizer"] = row_quantizer(self.target)
        return quant

    @property
    def has_prefill(self) -> bool:
        """True when this kernel has the bf16 prefill path (avx512 target, CPU with AVX512-BF16, float32 K / V)."""
        return self._prefill is not None

    def _dims_buffer(self) -> tuple[ctypes.Array, int]:
        try:
            return self._tls.dims
        except AttributeError:
            buf = (ctypes.c_int64 * (_DIMS8.size // 8))()
            self._tls.dims = (buf, ctypes.addressof(buf))
            return self._tls.dims

    def _operand(self, t: torch.Tensor, what: str) -> torch.Tensor:
        want = _F32 if what == "q" else self._kv
        if not isinstance(t, torch.Tensor) or t.dtype is not want:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            if want is _F32 and got is _I8:
                hint = "an int8 key / value needs attention_kernel(..., kv_dtype='int8') and key_scale / value_scale"
            elif want is _I8:
                hint = ("quantize with fxquant.qweight.quantize_activation_per_row, or use kv_dtype='float32' "
                        "for float key / value")
            else:
                hint = "cast with .float()"
            raise UnsupportedOp(f"{self.name}: {what} must be a{'n int8' if want is _I8 else ' float32'} tensor, "
                                f"got {got} ({hint})")
        if t.dim() != 4:
            raise ValueError(f"{self.name}: {what} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        if t.shape[3] != self.head_dim:
            raise UnsupportedOp(f"{self.name}: {what} has head dim {t.shape[3]}, this kernel is compiled for "
                                f"{self.head_dim} (use attention_kernel(head_dim={t.shape[3]}))")
        return t if t.stride(3) == 1 else t.contiguous()

    def _shape_error(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        for t, what in ((q, "q"), (key, "key"), (value, "value")):
            self._operand(t, what)  # a wrong head dim first
        raise ValueError(f"{self.name}: shapes do not match: q {tuple(q.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)} (need q [B, H, Lq, D], key and value [B, H, Lk, D])")

    def _mask(self, mask: torch.Tensor, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, tuple[int, ...]]:
        """float32 additive mask whose rows are contiguous, and its (B, H, Lq) strides (0 = broadcast)."""
        if mask.dtype is torch.bool:
            mask = torch.zeros(mask.shape, dtype=_F32).masked_fill_(mask.logical_not(), -math.inf)
        elif mask.dtype is not _F32:
            raise UnsupportedOp(f"{self.name}: mask must be bool or float32, got {mask.dtype}")
        lk = shape[3]
        if mask.dim() == 0 or mask.dim() > 4 or mask.shape[-1] not in (1, lk):
            raise ValueError(f"{self.name}: mask of shape {tuple(mask.shape)} is not broadcastable to "
                             f"[B, H, Lq, Lk] = {list(shape)}")
        if mask.shape[-1] != lk:
            mask = mask.expand(*mask.shape[:-1], lk).contiguous()
        elif mask.stride(-1) != 1 and lk > 1:
            mask = mask.contiguous()
        pad = 4 - mask.dim()
        sizes, strides = (1,) * pad + tuple(mask.shape), (0,) * pad + mask.stride()
        out = []
        for size, stride, want in zip(sizes[:3], strides[:3], shape[:3]):
            if size != want and size != 1:
                raise ValueError(f"{self.name}: mask of shape {tuple(mask.shape)} is not broadcastable to "
                                 f"[B, H, Lq, Lk] = {list(shape)}")
            out.append(stride if size > 1 else 0)
        return mask, tuple(out)

    def _scale_error(self, key_scale, value_scale, shape: tuple[int, int, int]) -> None:
        """Raise the error that says what is wrong with the scales of an int8 call (float32 [B, H, Lk, 1])."""
        if key_scale is None or value_scale is None:
            raise ValueError(f"{self.name}: int8 key / value need key_scale and value_scale (float32 [B, H, Lk, 1], "
                             "as from fxquant.qweight.quantize_activation_per_row)")
        for t, what in ((key_scale, "key_scale"), (value_scale, "value_scale")):
            if not isinstance(t, torch.Tensor) or t.dtype is not _F32:
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise UnsupportedOp(f"{self.name}: {what} must be a float32 tensor, got {got}")
            if tuple(t.shape) != (*shape, 1):
                raise ValueError(f"{self.name}: {what} must have shape [B, H, Lk, 1] = {[*shape, 1]}, "
                                 f"got {tuple(t.shape)}")
        raise ValueError(f"{self.name}: unsupported key_scale / value_scale")

    def __call__(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
                 scale: float | None = None, key_scale: torch.Tensor | None = None,
                 value_scale: torch.Tensor | None = None) -> torch.Tensor:
        if not self.runnable:
            self._check()
        kv = self._kv
        if kv is _F32 and (key_scale is not None or value_scale is not None):
            raise ValueError(f"{self.name}: key_scale / value_scale are for int8 key / value; this kernel takes "
                             "float32 ones (use attention_kernel(..., kv_dtype='int8'))")
        try:
            qs, ks, vs = q.stride(), key.stride(), value.stride()  # fast path: 4-D with unit last stride
        except AttributeError:  # not tensors: _operand says which
            qs = ks = vs = ()
        if not (len(qs) == len(ks) == len(vs) == 4 and q.dtype is _F32 and key.dtype is kv and value.dtype is kv
                and qs[3] == ks[3] == vs[3] == 1):
            q, key, value = self._operand(q, "q"), self._operand(key, "key"), self._operand(value, "value")
            qs, ks, vs = q.stride(), key.stride(), value.stride()
        b, h, lq, d = q.shape
        kshape = key.shape
        if d != self.head_dim or kshape[3] != d or kshape[:2] != (b, h) or value.shape != kshape:
            self._shape_error(q, key, value)
        lk = kshape[2]
        if mask is None:
            ms, mptr = _NO_MASK, None
        else:
            mst, msh = mask.stride(), mask.shape  # fast path: a float32 [Lq, Lk] (or [1, Lk]) mask with unit stride
            if not (mask.dtype is _F32 and len(mst) == 2 and mst[1] == 1 and msh[1] == lk and msh[0] in (lq, 1)):
                mask, ms = self._mask(mask, (b, h, lq, lk))
            else:
                ms = (0, 0, mst[0] if msh[0] > 1 else 0)
            mptr = mask.data_ptr()
        out = torch.empty_strided((b, h, lq, d), (lq * h * d, d, h * d, 1), dtype=_F32)  # [B, Lq, H, D].transpose(1, 2)
        buf, addr = self._dims_buffer()
        scale = self.default_scale if scale is None else scale
        if mptr is None and self._prefill is not None and lq >= self.prefill_min_rows:
            _DIMS.pack_into(buf, 0, b, h, lq, lk, *qs, *ks, *vs, *ms, self.par_min)
            self._prefill(q.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), addr, num_threads(), scale)
            return out
        if kv is _F32:
            _DIMS.pack_into(buf, 0, b, h, lq, lk, *qs, *ks, *vs, *ms, self.par_min)
            self._fn(q.data_ptr(), key.data_ptr(), value.data_ptr(), mptr, out.data_ptr(), addr,
                     num_threads(), scale)
            return out
        try:  # any strides; the size-1 last axis has none that matters
            kss, vss = key_scale.stride(), value_scale.stride()
            ok = key_scale.dtype is _F32 and value_scale.dtype is _F32 and key_scale.shape == value_scale.shape
        except AttributeError:
            ok = False
        if not (ok and kss[3:] and key_scale.shape == (b, h, lk, 1)):
            self._scale_error(key_scale, value_scale, (b, h, lk))
        _DIMS8.pack_into(buf, 0, b, h, lq, lk, *qs, *ks, *vs, *ms, self.par_min, kss[0], kss[1], kss[2], vss[0],
                         vss[1], vss[2])
        self._fn(q.data_ptr(), key.data_ptr(), value.data_ptr(), mptr, out.data_ptr(), addr,
                 num_threads(), scale, key_scale.data_ptr(), value_scale.data_ptr())
        return out


@lru_cache(maxsize=None)
def _build(head_dim: int, target: Target, cache_dir: str | None, kv_dtype: str, split: int) -> AttentionKernel:
    name, src = render_attention(head_dim, target, kv_dtype, split)
    lib = load_kernel_library(src, name, target.flags, cache_dir)
    return AttentionKernel(name, target, src, lib, head_dim, kv_dtype)


def attention_kernel(head_dim: int, target: str | Target = "native", cache_dir: str | None = None,
                     kv_dtype: str = "float32", prefill_split: int = 0) -> AttentionKernel:
    """The attention kernel for one head dim, target ("avx512" | "avx2" | "portable" | "native" or a
    Target) and key / value dtype ("float32" or "int8"), compiled once per process (and cached on disk by
    content hash)."""
    if isinstance(target, str) and target == "reference":
        raise UnsupportedOp("target 'reference' has no compiled kernel: call F.scaled_dot_product_attention")
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {list(KV_DTYPES)}, got {kv_dtype!r}")
    if prefill_split not in PREFILL_SPLITS:
        raise ValueError(f"prefill_split must be one of {PREFILL_SPLITS}, got {prefill_split!r}")
    return _build(head_dim, resolve_target(target), None if cache_dir is None else str(cache_dir), kv_dtype,
                  prefill_split)
