"""The compile's memo of `quantize_weight`: an always-valid analysis shared by the passes that quantize.

Example:
    >>> import torch
    >>> cache = QuantCache()
    >>> w = torch.randn(8, 64)
    >>> cache.quantize(w, 4) is cache.quantize(w, 4), cache.hits
    (True, 1)
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .analysis import Analysis
from .formats import quantize_weight
from .qweight import QuantizedWeight


class QuantCache(Analysis):
    """Memo of `quantize_weight` for one compile: a (weight, format, statistics) triple is quantized once.

    The sensitivity sweep quantizes every candidate format of every layer and the quantize pass
    then quantizes the chosen one again; with a shared cache the second time is a lookup. Keys hold
    the tensors' identity and version counters (not their data): a weight changed in place is
    quantized afresh. Entries keep their tensors alive; `max_bytes` bounds the stored results
    (least recently used out). Thread-safe; results are shared, so treat them as read-only.

    Example:
        >>> cache = QuantCache()
        >>> w = torch.randn(8, 64)
        >>> cache.quantize(w, 4) is cache.quantize(w, 4), cache.hits
        (True, 1)
    """

    provider = "(on demand)"
    about = "memo of quantize_weight"
    always_valid = True  # keyed by tensor identity and version: a graph change never makes an entry wrong

    @classmethod
    def compute(cls, gm, ctx) -> "QuantCache":
        return cls()

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes, self.stored_bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _tensor_key(t: torch.Tensor | None) -> tuple:
        return (None,) if t is None else (id(t), t._version, t.data_ptr(), tuple(t.shape), t.dtype)

    def quantize(
        self,
        weight: torch.Tensor,
        bits: int,
        scheme: str = "uniform",
        granularity: str = "channel",
        group_size: int | None = None,
        symmetric: bool = True,
        hdiag: torch.Tensor | None = None,
        hessian: torch.Tensor | None = None,
        rounding: str = "nearest",
        where: str = "weight",
    ) -> QuantizedWeight:
        """quantize_weight(...) with the same arguments, from the cache when it was computed before."""
        key = (
            self._tensor_key(weight),
            bits,
            scheme,
            granularity,
            group_size,
            symmetric,
            self._tensor_key(hdiag),
            self._tensor_key(hessian) if rounding == "gptq" else (None,),
            rounding,
        )
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] is weight and hit[1] is hdiag:
                self._entries.move_to_end(key)
                self.hits += 1
                return hit[3]
        qw = quantize_weight(
            weight, bits, scheme, granularity, group_size, symmetric, hdiag, hessian, rounding, where
        )
        size = sum(t.numel() * t.element_size() for t in (qw.codes, qw.table, qw.table_index, qw.scales))
        with self._lock:
            self.misses += 1
            if size <= self.max_bytes:
                old = self._entries.pop(key, None)
                self.stored_bytes -= old[4] if old is not None else 0
                self._entries[key] = (weight, hdiag, hessian, qw, size)
                self.stored_bytes += size
                while self.stored_bytes > self.max_bytes:
                    self.stored_bytes -= self._entries.popitem(last=False)[1][4]
        return qw


def quant_cache(ctx) -> QuantCache:
    """The compile's shared QuantCache (an on-demand analysis in ctx.analyses): passes that quantize the same
    (weight, format) twice, e.g. the sensitivity sweep and this pass, get the second one for free.

    Example (in a pass):
    `qw = quant_cache(ctx).quantize(weight, bits, scheme, ..., hdiag=stats.get("hdiag"))`.
    """
    return ctx.analyses.get(QuantCache)
