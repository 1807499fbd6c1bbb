"""Per-row int8 quantization of attention keys / values as one generated C kernel (templates/kv_quant.c.j2).

`row_quantizer(target)(t)` returns what `fxquant.kv_rows.kv_int8_per_row(t)` returns, bit for bit (NaN, inf
and
zero rows too), for a float32 [B, H, L, D] tensor whose last axis has unit stride (strided views such as a
slice of Whisper's cross-attention cache included): int8 rows and float32 [B, H, L, 1] scales, both
contiguous. One pass over each row on the thread pool, instead of torch's six passes over the tensor: the
eight key / value tensors of Whisper tiny.en's cross cache for a batch of 8 windows (8 x 6 x 1500 x 64 each)
took 12 ms instead of 37 ms (2 threads, busy machine).

Example:
    >>> import torch
    >>> from fxquant.kv_rows import kv_int8_per_row
    >>> quant = row_quantizer("portable")                                        # doctest: +SKIP
    >>> t = torch.randn(2, 3, 5, 8)
    >>> all(torch.equal(a, b) for a, b in zip(quant(t), kv_int8_per_row(t)))     # doctest: +SKIP
    True
"""
from __future__ import annotations

import ctypes

import torch

from .kernel_base import _Kernel, target_kernel
from .targets import Target
from .threadpool import num_threads

__all__ = ["RowQuantizer", "row_quantizer"]

_VP, _INT = ctypes.c_void_p, ctypes.c_int


class RowQuantizer(_Kernel):
    """(q int8 [B, H, L, D], scale float32 [B, H, L, 1]) = quantizer(t float32 [B, H, L, D])."""

    def __init__(self, name: str, target: Target, source: str, lib: ctypes.CDLL):
        super().__init__(name, target, source)
        self.lib = lib
        self._fn = lib.fx_kv_quant
        self._fn.argtypes = [_VP, _VP, _VP, _VP, _INT]
        self._fn.restype = None

    def __call__(self, t: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """out: contiguous int8 [B, H, L, D] and float32 [B, H, L, 1] tensors to write into (else new)."""
        if not self.runnable:
            self._check()
        if not isinstance(t, torch.Tensor) or t.dtype is not torch.float32 or t.dim() != 4:
            got = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{self.name}: expects a float32 [B, H, L, D] tensor, got {got}")
        if t.device.type != "cpu":
            raise ValueError(f"{self.name}: expects a CPU tensor, got one on {t.device}")
        if t.stride(3) != 1 and t.shape[3] > 1:
            t = t.contiguous()
        b, h, rows, d = t.shape
        if out is None:
            q = torch.empty((b, h, rows, d), dtype=torch.int8)
            s = torch.empty((b, h, rows, 1), dtype=torch.float32)
        else:
            q, s = out
            want = (torch.int8, torch.float32, (b, h, rows, d), (b, h, rows, 1))
            if (q.dtype, s.dtype, tuple(q.shape), tuple(s.shape)) != want \
                    or not (q.is_contiguous() and s.is_contiguous()):
                raise ValueError(f"{self.name}: out must be contiguous int8 {[b, h, rows, d]} and float32 "
                                 f"{[b, h, rows, 1]} tensors")
        if q.numel():
            sb, sh, sl = t.stride(0), t.stride(1), t.stride(2)
            dims = (ctypes.c_int64 * 7)(b, h, rows, d, sb, sh, sl)
            self._fn(t.data_ptr(), ctypes.addressof(dims), q.data_ptr(), s.data_ptr(), num_threads())
        return q, s


def row_quantizer(target: str | Target = "native", cache_dir: str | None = None) -> RowQuantizer:
    """The per-row int8 quantizer for a target ("avx512" | "avx2" | "portable" | "native" or a Target),
    built once per process (and cached on disk by content hash)."""
    return target_kernel(RowQuantizer, "kv_quant.c.j2", target, cache_dir)
