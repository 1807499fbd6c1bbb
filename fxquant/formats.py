"""Weight formats are data: a registry of entries (name, quantize -> QuantizedWeight, byte cost).

Entries: "uniform" (symmetric or asymmetric b-bit, b in 2..8), "codebook" (2^b learned int8
levels per channel or per (channel, group)), "float" (kept in fp32). Every quantized format packs
into the one `fxquant.qweight.QuantizedWeight` contract, so `qweight.reference_linear` is the
reference math of all of them. Granularity: "tensor" (one grid), "channel" (one per output row),
"group" (one per `group_size` input elements; the last group may be partial).

Byte costs are exact: `weight_bytes(...) == quantize_weight(...).nbytes()` (tables are never
de-duplicated: symmetric uniform = 1 table, asymmetric = 2^b tables (one per zero point),
codebook = one table per grid (row or (row, group)), per-tensor codebook = 1 table).

Example:
    >>> import torch
    >>> qw = quantize_weight(torch.randn(16, 128), bits=4, scheme="codebook", granularity="channel")
    >>> qw.nbytes() == weight_bytes((16, 128), 4, "codebook", "channel")
    True
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import ConfigError
from .qweight import QuantizedWeight
from .quantizers import Grid, gptq, grid_round
from .quantizers import codebook as _codebook
from .quantizers import uniform as _uniform

GRANULARITIES = ("tensor", "channel", "group")
ROUNDINGS = ("nearest", "gptq")


@dataclass(frozen=True)
class Format:
    """A registry entry: `fit(block [R,P], bits, symmetric, weight) -> Grid`, the table layout, the cost.

    quantize_groups(w [R, G, P], bits, symmetric, weight [1|R, G, P] | None) -> (codes uint8 [R, G, P],
    Grid over R*G rows): the vectorised nearest-rounding path over all groups of a layer at once.
    """

    name: str
    fit: Callable[..., Grid] | None
    num_tables: Callable[[int, int, int, bool], int]   # (bits, rows, groups, symmetric) -> T
    bits_allowed: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    description: str = ""
    quantize_groups: Callable[..., tuple[torch.Tensor, Grid]] | None = None


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


register_format(Format(
    "uniform",
    lambda blk, bits, symmetric, weight: _uniform.fit(blk, bits, symmetric, weight),
    lambda bits, rows, groups, symmetric: 1 if symmetric else 1 << bits,
    description="uniform b-bit levels, symmetric (one table) or asymmetric (one table per zero point)",
    quantize_groups=lambda w, bits, symmetric, weight: _uniform.quantize_groups(w, bits, symmetric, weight)))
register_format(Format(
    "codebook",
    lambda blk, bits, symmetric, weight: _codebook.fit(blk, bits, weight),
    lambda bits, rows, groups, symmetric: rows * groups,
    description="2^b int8 levels per channel / group learned by weighted k-means",
    quantize_groups=lambda w, bits, symmetric, weight: _codebook.quantize_groups(w, bits, weight)))
register_format(Format("float", None, lambda *a: 0, (32,), "weights stay fp32"))


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ConfigError(f"unknown weight scheme {name!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[name]


def resolve_group_size(granularity: str, group_size: int | None, k: int, where: str = "weight") -> int:
    """Elements per scale group along K: K for tensor/channel; an explicit group must be in 1..K."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"{where}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity != "group":
        return k
    if group_size is None:
        raise ConfigError(f"{where}: granularity 'group' needs a group_size (e.g. 32, 64, 128)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size > k:
        raise ConfigError(f"{where}: group_size must be an integer in 1..{k} (the input size K), got {group_size!r}")
    return group_size


def check_bits(scheme: str, bits: int, symmetric: bool, where: str = "weight") -> None:
    fmt = get_format(scheme)
    if scheme == "float":
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in fmt.bits_allowed:
        raise ConfigError(f"{where}: {scheme} weights need bits in {list(fmt.bits_allowed)}, got {bits!r}")
    if scheme == "uniform" and not symmetric and bits == 8:
        raise ConfigError(f"{where}: 8-bit asymmetric levels (q - z up to 255) cannot be stored in the int8 "
                          f"level table; use symmetric=True at 8 bits or asymmetric at <= 7 bits")


def weight_bytes(shape: tuple[int, int], bits: int | None, scheme: str = "uniform", granularity: str = "channel",
                 group_size: int | None = None, symmetric: bool = True) -> int:
    """Exact deployed bytes of an [N, K] weight in this format (equals QuantizedWeight.nbytes())."""
    n, k = shape
    if bits is None or scheme == "float":
        return 4 * n * k
    gs = resolve_group_size(granularity, group_size, k)
    g = math.ceil(k / gs)
    t = get_format(scheme).num_tables(bits, n, g, symmetric)
    if scheme == "codebook" and granularity == "tensor":
        t = 1
    index_bytes = 0 if t == 1 else n * g * (1 if t <= 256 else 2)
    return math.ceil(n * k * bits / 8) + n * g * 4 + t * (1 << bits) + index_bytes


def _check_weight(w: torch.Tensor, where: str) -> torch.Tensor:
    if w.dim() < 2:
        raise ConfigError(f"{where}: weight must be at least 2-D [N, K...], got shape {tuple(w.shape)}")
    w2 = w.detach().reshape(w.shape[0], -1).float()
    if w2.numel() == 0:
        raise ConfigError(f"{where}: weight has a zero-size dimension {tuple(w.shape)}; remove the layer "
                          f"or keep it in float with a rule {{'float': True}}")
    if not torch.isfinite(w2).all():
        bad = int((~torch.isfinite(w2)).sum())
        raise ConfigError(f"{where}: weight contains {bad} NaN/Inf values; fix the checkpoint before quantizing")
    return w2


def quantize_weight(weight: torch.Tensor, bits: int, scheme: str = "uniform", granularity: str = "channel",
                    group_size: int | None = None, symmetric: bool = True, hdiag: torch.Tensor | None = None,
                    hessian: torch.Tensor | None = None, rounding: str = "nearest",
                    where: str = "weight") -> QuantizedWeight:
    """Quantize weight [N, K...] (flattened to [N, K]) into a QuantizedWeight.

    hdiag [K]: input-channel energy (weights the k-means and the clip search); hessian [K, K]:
    E[x x^T], required for rounding="gptq". `where` names the node in error messages.
    """
    if scheme == "float":
        raise ConfigError(f"{where}: scheme 'float' is not quantized; skip the node instead")
    check_bits(scheme, bits, symmetric, where)
    if rounding not in ROUNDINGS:
        raise ConfigError(f"{where}: rounding must be one of {ROUNDINGS}, got {rounding!r}")
    w = _check_weight(weight, where)
    k = w.shape[1]
    gs = resolve_group_size(granularity, group_size, k, where)
    fmt = get_format(scheme)
    if hdiag is None and hessian is not None:
        hdiag = hessian.diagonal()
    if hdiag is not None:
        hdiag = hdiag.float().reshape(-1)
        if hdiag.numel() != k:
            raise ConfigError(f"{where}: calibration statistics have {hdiag.numel()} input channels but the "
                              f"weight has K={k}; re-run calibrate on this graph")

    def fit_block(blk: torch.Tensor, start: int) -> Grid:
        wt = None if hdiag is None else hdiag[start:start + blk.shape[1]]
        if granularity == "tensor":
            flat = blk.reshape(1, -1)
            wt_flat = None if wt is None else wt.expand(blk.shape[0], -1).reshape(1, -1)
            return fmt.fit(flat, bits, symmetric, wt_flat).expand(blk.shape[0])
        return fmt.fit(blk, bits, symmetric, wt)

    if rounding == "gptq":
        if hessian is None:
            raise ConfigError(f"{where}: rounding='gptq' needs the input second moments H; run the calibrate "
                              f"pass first (or use rounding='nearest')")
        starts = iter(range(0, k, gs))
        codes, grids = gptq.gptq_round(w, hessian, lambda blk: fit_block(blk, next(starts)), gs)
        grid = _stack_grids(grids)
    elif granularity == "tensor":
        grid = fit_block(w, 0)
        codes = grid_round(w, grid)[0]
        grid = _stack_grids([grid])
    else:
        codes, grid = _nearest_groups(fmt, w, bits, symmetric, gs, hdiag)
    return _assemble(scheme, bits, symmetric, granularity, gs, codes, grid)


def _stack_grids(grids: list[Grid]) -> Grid:
    """Per-group grids of N rows each -> one Grid of N*G rows in (row, group) order."""
    return Grid(torch.stack([g.scale for g in grids], 1).reshape(-1),
                torch.stack([g.levels for g in grids], 1).reshape(-1, grids[0].levels.shape[1]),
                torch.stack([g.table_id for g in grids], 1).reshape(-1))


def _nearest_groups(fmt: Format, w: torch.Tensor, bits: int, symmetric: bool, gs: int,
                    hdiag: torch.Tensor | None) -> tuple[torch.Tensor, Grid]:
    """Nearest rounding of every group of w [N, K] in one vectorised call (plus one for a partial last group)."""
    n, k = w.shape
    full = k // gs
    spans = [(0, full * gs, full, gs)] if full else []
    if k > full * gs:
        spans.append((full * gs, k, 1, k - full * gs))
    codes, grids = [], []
    for start, end, groups, size in spans:
        block = w[:, start:end].reshape(n, groups, size)
        weight = None if hdiag is None else hdiag[start:end].reshape(1, groups, size)
        c, g = fmt.quantize_groups(block, bits, symmetric, weight)
        codes.append(c.reshape(n, end - start))
        grids.append(Grid(g.scale.view(n, groups), g.levels.view(n, groups, -1), g.table_id.view(n, groups)))
    if len(grids) == 1:
        c, g = codes[0], grids[0]
    else:
        c = torch.cat(codes, 1)
        g = Grid(*(torch.cat([getattr(p, f) for p in grids], 1) for f in ("scale", "levels", "table_id")))
    return c, Grid(g.scale.reshape(-1), g.levels.reshape(n * g.scale.shape[1], -1), g.table_id.reshape(-1))


def _assemble(scheme: str, bits: int, symmetric: bool, granularity: str, gs: int, codes: torch.Tensor,
              grid: Grid) -> QuantizedWeight:
    """Pack the (row, group) grids (N*G rows, row-major) + codes into the QuantizedWeight contract."""
    n = codes.shape[0]
    g = grid.scale.numel() // n
    scales = grid.scale.reshape(n, g).float()
    if scheme == "uniform":
        table = _uniform.tables(bits, symmetric)
        table_index = grid.table_id.reshape(n, g).to(torch.int32)
    elif granularity == "tensor":
        table = grid.levels[:1].clone()
        table_index = torch.zeros(n, g, dtype=torch.int32)
    else:
        table = grid.levels.reshape(n * g, -1).clone()
        table_index = torch.arange(n * g, dtype=torch.int32).view(n, g)
    return QuantizedWeight(bits=bits, codes=codes.to(torch.uint8), table=table.to(torch.int8),
                           table_index=table_index.contiguous(), scales=scales.contiguous(), group_size=gs,
                           scheme=scheme, granularity=granularity)


class QuantCache:
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

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes, self.stored_bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _tensor_key(t: torch.Tensor | None) -> tuple:
        return (None,) if t is None else (id(t), t._version, t.data_ptr(), tuple(t.shape), t.dtype)

    def quantize(self, weight: torch.Tensor, bits: int, scheme: str = "uniform", granularity: str = "channel",
                 group_size: int | None = None, symmetric: bool = True, hdiag: torch.Tensor | None = None,
                 hessian: torch.Tensor | None = None, rounding: str = "nearest",
                 where: str = "weight") -> QuantizedWeight:
        """quantize_weight(...) with the same arguments, from the cache when it was computed before."""
        key = (self._tensor_key(weight), bits, scheme, granularity, group_size, symmetric,
               self._tensor_key(hdiag), self._tensor_key(hessian) if rounding == "gptq" else (None,), rounding)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] is weight and hit[1] is hdiag:
                self._entries.move_to_end(key)
                self.hits += 1
                return hit[3]
        qw = quantize_weight(weight, bits, scheme, granularity, group_size, symmetric, hdiag, hessian, rounding, where)
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


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(||ref||^2 / ||ref - approx||^2) (inf when exact)."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10 * math.log10(max(signal, 1e-300) / noise)


def quant_cache(ctx) -> QuantCache:
    """The compile's shared QuantCache (ctx.state["quant_cache"]): passes that quantize the same
    (weight, format) twice, e.g. the sensitivity sweep and this pass, get the second one for free.

    Example (in a pass): `qw = quant_cache(ctx).quantize(weight, bits, scheme, ..., hdiag=stats.get("hdiag"))`.
    """
    cache = ctx.state.get("quant_cache")
    if cache is None:
        cache = ctx.state["quant_cache"] = QuantCache()
    return cache
