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
    """A registry entry: `fit(block [R,P], bits, symmetric, weight) -> Grid`, the table layout, the cost."""

    name: str
    fit: Callable[..., Grid] | None
    num_tables: Callable[[int, int, int, bool], int]   # (bits, rows, groups, symmetric) -> T
    bits_allowed: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    description: str = ""


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


register_format(Format(
    "uniform",
    lambda blk, bits, symmetric, weight: _uniform.fit(blk, bits, symmetric, weight),
    lambda bits, rows, groups, symmetric: 1 if symmetric else 1 << bits,
    description="uniform b-bit levels, symmetric (one table) or asymmetric (one table per zero point)"))
register_format(Format(
    "codebook",
    lambda blk, bits, symmetric, weight: _codebook.fit(blk, bits, weight),
    lambda bits, rows, groups, symmetric: rows * groups,
    description="2^b int8 levels per channel / group learned by weighted k-means"))
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
    n, k = w.shape
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
    else:
        grids, parts = [], []
        for start in range(0, k, gs):
            grid = fit_block(w[:, start:start + gs], start)
            parts.append(grid_round(w[:, start:start + gs], grid)[0])
            grids.append(grid)
        codes = torch.cat(parts, 1)
    return _assemble(scheme, bits, symmetric, granularity, gs, codes, grids)


def _assemble(scheme: str, bits: int, symmetric: bool, granularity: str, gs: int, codes: torch.Tensor,
              grids: list[Grid]) -> QuantizedWeight:
    """Pack per-group grids + codes into the QuantizedWeight contract (codes index the level row)."""
    n = codes.shape[0]
    g = len(grids)
    scales = torch.stack([gr.scale for gr in grids], 1).float()
    if scheme == "uniform":
        table = _uniform.tables(bits, symmetric)
        table_index = torch.stack([gr.table_id for gr in grids], 1).to(torch.int32)
    elif granularity == "tensor":
        table = grids[0].levels[:1].clone()
        table_index = torch.zeros(n, g, dtype=torch.int32)
    else:
        table = torch.stack([gr.levels for gr in grids], 1).reshape(n * g, -1).clone()
        table_index = torch.arange(n * g, dtype=torch.int32).view(n, g)
    return QuantizedWeight(bits=bits, codes=codes.to(torch.uint8), table=table.to(torch.int8),
                           table_index=table_index, scales=scales, group_size=gs, scheme=scheme,
                           granularity=granularity)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(||ref||^2 / ||ref - approx||^2) (inf when exact)."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10 * math.log10(max(signal, 1e-300) / noise)
