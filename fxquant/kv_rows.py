"""Per-row int8 attention keys / values: the conversion, and a memo that converts each tensor once.

Attention keys and values that stay constant over many calls (Whisper's cross-attention cache, read by
every decode step) are used as int8 rows with one float32 scale per row: `quantize_rows(x)` gives
(codes int8 [..., D], scales float32 [..., 1]) with x ~= codes * scales, bit for bit what
`fxquant.qweight.quantize_activation_per_row` gives (NaN, inf and zero rows too). A compiled module
whose graph input is such keys / values (pass int8-kv-inputs) takes that pair, or a float tensor that
`RowsMemo` converts once and reuses while the same unmodified tensor comes back.

Example:
    >>> import torch
    >>> x = torch.randn(2, 3, 5, 8)
    >>> codes, scales = quantize_rows(x)
    >>> codes.dtype, tuple(scales.shape), bool((codes * scales - x).abs().max() < 0.05)
    (torch.int8, (2, 3, 5, 1), True)
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

__all__ = ["kv_int8_per_row", "quantize_rows", "RowsMemo", "Int8RowInputs"]


def kv_int8_per_row(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_activation_per_row(t)` bit for bit (NaN, inf and zero rows too) in fewer passes over `t`:
    one min/max pass instead of abs + max, rounding and clamping in place.

    Example:
        >>> from fxquant.qweight import quantize_activation_per_row
        >>> t = torch.randn(2, 3, 5, 8)
        >>> all(torch.equal(a, b) for a, b in zip(kv_int8_per_row(t), quantize_activation_per_row(t)))
        True
    """
    x = t if t.dtype == torch.float32 else t.float()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)   # (torch.aminmax here: 15x slower)
    absmax = torch.maximum(hi, lo.neg())
    nonzero = absmax > 0
    safe = torch.where(nonzero, absmax, torch.ones_like(absmax))
    q = torch.mul(x, torch.tensor(127.0, dtype=torch.float32) / safe)
    q.round_().clamp_(-127, 127)
    scale = torch.where(nonzero, absmax / 127.0, torch.ones_like(absmax))
    return q.to(torch.int8), torch.where(torch.isnan(absmax), absmax, scale)


def quantize_rows(t: torch.Tensor, quantizer: Any = None,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8, scales float32 [..., 1]) of a float tensor, one scale per last-axis row.

    `quantizer`: a C row quantizer (fxquant.codegen.kv_quant.row_quantizer; the same bits, one pass) used
    for float32 tensors whose rows are contiguous; `out`: contiguous tensors of those shapes to write into
    (a window of a caller's batch buffer) instead of new ones.

    Example:
        >>> codes, scales = torch.empty(4, 8, dtype=torch.int8), torch.empty(4, 1)
        >>> _ = quantize_rows(torch.randn(4, 8), out=(codes, scales))
        >>> bool(scales.min() > 0)
        True
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 1:
        got = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"quantize_rows expects a float tensor with at least one axis, got {got}")
    shape, scale_shape = tuple(t.shape), (*t.shape[:-1], 1)
    if out is not None:
        codes, scales = out
        if (tuple(codes.shape), tuple(scales.shape)) != (shape, scale_shape) or codes.dtype != torch.int8 \
                or scales.dtype != torch.float32 or not (codes.is_contiguous() and scales.is_contiguous()):
            raise ValueError(f"quantize_rows: out must be contiguous int8 {list(shape)} and float32 "
                             f"{list(scale_shape)} tensors")
    if quantizer is not None and t.dtype == torch.float32 and t.dim() == 4 and t.numel():
        return quantizer(t, out=out)           # any strides (a view of a cache): the quantizer reads them
    if quantizer is not None and t.dtype == torch.float32 and t.is_contiguous() and t.numel():
        rows = t.view(1, 1, -1, shape[-1])
        flat_out = None if out is None else (out[0].view(1, 1, -1, shape[-1]), out[1].view(1, 1, -1, 1))
        codes, scales = quantizer(rows, out=flat_out)
        return (codes.view(shape), scales.view(scale_shape)) if out is None else out
    codes, scales = kv_int8_per_row(t)
    if out is None:
        return codes, scales
    out[0].copy_(codes)
    out[1].copy_(scales)
    return out


class RowsMemo:
    """quantize_rows(t) per slot, reused while the same unmodified tensor (or a view of the same memory) comes
    back: the same tensor object underneath, same data pointer, shape and strides, same version counter (an
    in-place write bumps it). A decode loop that passes one float cache to every step converts it once.

    Example:
        >>> memo, x = RowsMemo(), torch.randn(3, 8)
        >>> memo.get(0, x)[0] is memo.get(0, x)[0]
        True
        >>> a = memo.get(0, x)[0]; _ = x.mul_(2); memo.get(0, x)[0] is a
        False
    """

    def __init__(self, quantizer: Any = None):
        self.quantizer = quantizer
        self._slots: dict[Any, tuple] = {}

    def get(self, slot: Any, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        base = t._base if t._base is not None else t
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t._version)
        hit = self._slots.get(slot)
        if hit is not None and hit[0]() is base and hit[1] == key:
            return hit[2]
        packed = quantize_rows(t, self.quantizer)
        self._slots[slot] = (weakref.ref(base), key, packed)   # one assignment: safe across threads
        return packed

    def clear(self) -> None:
        """Drop every kept conversion (they would otherwise outlive the tensors they came from)."""
        self._slots = {}


class Int8RowInputs:
    """What a CompiledModule offers for the inputs it takes as int8 rows (pass int8-kv-inputs; its
    `input_spec.row_inputs` names them): the conversion with the module's own quantizer, and the memo that
    converts a float tensor given there once per tensor."""

    def int8_rows(self, t: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None):
        """(codes, scales) of float keys/values for such an input; `out`: tensors to write into
        (quantize_rows). Converting once and passing the pair saves the float copy (a decode loop: the
        cross-attention cache).

        Example:
            >>> codes, scales = cm.int8_rows(cross)                       # doctest: +SKIP
            >>> logits, cache = cm(tokens, (codes, scales), cache, offset)  # doctest: +SKIP
        """
        return quantize_rows(t, self._rows_memo().quantizer, out)

    def _rows_memo(self) -> RowsMemo:
        memo = self.__dict__.get("_rows")
        if memo is None:                     # a kv-int8 attention kernel's quantizer: the same bits, in C
            kernels = (getattr(m, "kernel", None) for m in self.graph_module.modules())
            found = (getattr(k, "quantize_rows", None) for k in kernels)
            quant = next((q for q in found if q is not None), None)
            memo = self.__dict__["_rows"] = RowsMemo(quant)
        return memo

    def forget_inputs(self) -> None:
        """Drop the int8 conversions kept of float inputs (they would outlive the tensors they came from)."""
        self.__dict__.pop("_rows", None)
