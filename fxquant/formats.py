"""Weight formats are data: one `Format` entry per format in the `FORMATS` table.

An entry holds everything that differs between formats (see README "Adding a weight format"):
    packing      `fit` / `quantize_groups` (the levels and codes) and `tables` (the int8 level
                 tables + per-(row, group) table index of the QuantizedWeight contract);
    reference    the reference math (`qweight.dequantize`: W = scale * table[index, code]);
    byte cost    `num_tables` (tables stored) -> `weight_bytes`, exact;
    solver       `candidates`: per `scheme` option, the widths the budget solver considers, and
                 `granularity(bits, group_asked)`: its default granularity for a width;
    kernel       the kernel family in `fxquant.codegen.kernel_table.KERNELS` (template + packing per target).
Entries: "uniform" (symmetric or asymmetric b-bit, b in 2..8), "codebook" (2^b learned int8 levels per
channel or per (channel, group)), "float" (kept in fp32). Every quantized format packs into the one
`fxquant.qweight.QuantizedWeight` contract. Granularity: "tensor" (one grid), "channel" (one per output
row), "group" (one per `group_size` input elements; the last group may be partial).

Byte costs are exact: `weight_bytes(...) == quantize_weight(...).nbytes()` (tables are never
de-duplicated: symmetric uniform = 1 table, asymmetric = 2^b tables (one per zero point),
codebook = one table per grid (row or (row, group)), per-tensor codebook = 1 table).

Example:
    >>> import torch
    >>> qw = quantize_weight(torch.randn(16, 128), bits=4, scheme="codebook", granularity="channel")
    >>> qw.nbytes() == weight_bytes((16, 128), 4, "codebook", "channel")
    True
    >>> candidates("codebook")
    ((8, 'uniform'), (6, 'uniform'), (4, 'codebook'), (3, 'codebook'), (2, 'codebook'))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import qweight as _qweight
from .errors import ConfigError
from .qweight import QuantizedWeight, dequantize
from .quantizers import Grid, gptq, grid_round
from .quantizers import codebook as _codebook
from .quantizers import uniform as _uniform

GRANULARITIES = ("tensor", "channel", "group")
ROUNDINGS = ("nearest", "gptq")
AUTO = "auto"   # the scheme option that lets the solver pick among every format's candidates


@dataclass(frozen=True)
class Format:
    """One row of the format table (fields in the module docstring).

    fit(block [R, P], bits, symmetric, weight [P] | None) -> Grid; quantize_groups(w [R, G, P], bits,
    symmetric, weight [1|R, G, P] | None) -> (codes uint8 [R, G, P], Grid over R*G rows): the vectorised
    nearest-rounding path over all groups of a layer at once; tables(bits, symmetric, granularity,
    grid, n, g) -> (table int8 [T, 2^bits], table_index int32 [n, g]); num_tables(bits, rows, groups,
    symmetric, granularity) -> T; check(bits, symmetric) -> an error text or None.
    """

    name: str
    fit: Callable[..., Grid] | None
    num_tables: Callable[[int, int, int, bool, str], int]
    bits_allowed: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    description: str = ""
    quantize_groups: Callable[..., tuple[torch.Tensor, Grid]] | None = None
    tables: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    reference: Callable[[QuantizedWeight], torch.Tensor] = dequantize
    candidates: dict[str, tuple[int, ...]] = field(default_factory=dict)
    granularity: Callable[[int, bool], str | None] = lambda bits, group_asked: None
    check: Callable[[int, bool], str | None] = lambda bits, symmetric: None
    kernel: str | None = "lut"


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add a row to the table (QuantizedWeight then accepts `fmt.name` as its scheme)."""
    FORMATS[fmt.name] = fmt
    if fmt.fit is not None and fmt.name not in _qweight.SCHEMES:
        _qweight.SCHEMES.append(fmt.name)
    return fmt


def _uniform_tables(bits, symmetric, granularity, grid, n, g):
    return _uniform.tables(bits, symmetric), grid.table_id.reshape(n, g).to(torch.int32)


def _codebook_tables(bits, symmetric, granularity, grid, n, g):
    if granularity == "tensor":
        return grid.levels[:1].clone(), torch.zeros(n, g, dtype=torch.int32)
    return grid.levels.reshape(n * g, -1).clone(), torch.arange(n * g, dtype=torch.int32).view(n, g)


register_format(Format(
    "uniform",
    fit=lambda blk, bits, symmetric, weight: _uniform.fit(blk, bits, symmetric, weight),
    num_tables=lambda bits, rows, groups, symmetric, granularity: 1 if symmetric else 1 << bits,
    description="uniform b-bit levels, symmetric (one table) or asymmetric (one table per zero point)",
    quantize_groups=lambda w, bits, symmetric, weight: _uniform.quantize_groups(w, bits, symmetric, weight),
    tables=_uniform_tables,
    candidates={"uniform": (8, 6, 5, 4, 3, 2), "codebook": (8, 6), AUTO: (8, 6, 5, 4, 3, 2)},
    granularity=lambda bits, group_asked: "channel" if bits >= 5 else None,   # None: group of group_size
    check=lambda bits, symmetric: None if symmetric or bits < 8 else (
        "8-bit asymmetric levels (q - z up to 255) cannot be stored in the int8 level table; use "
        "symmetric=True at 8 bits or asymmetric at <= 7 bits")))
register_format(
    Format(
        "codebook",
        fit=lambda blk, bits, symmetric, weight: _codebook.fit(blk, bits, weight),
        num_tables=lambda bits, rows, groups, symmetric, granularity: (
            1 if granularity == "tensor" else rows * groups
        ),
        description="2^b int8 levels per channel / group learned by weighted k-means",
        quantize_groups=lambda w, bits, symmetric, weight: _codebook.quantize_groups(w, bits, weight),
        tables=_codebook_tables,
        candidates={"codebook": (4, 3, 2), AUTO: (4, 3, 2)},
        granularity=lambda bits, group_asked: "group" if group_asked else "channel",
    )
)
register_format(Format("float", None, lambda *a: 0, (32,), "weights stay fp32", kernel=None))


def quantized_formats() -> tuple[str, ...]:
    """Names of the formats that quantize (every entry but "float")."""
    return tuple(name for name, fmt in FORMATS.items() if fmt.fit is not None)


def scheme_options() -> tuple[str, ...]:
    """Values of compile_lowbit's `scheme`: every format the solver can be restricted to, then "auto"."""
    return tuple(name for name, fmt in FORMATS.items() if fmt.candidates.get(name)) + (AUTO,)


def candidates(scheme: str) -> tuple[tuple[int, str], ...]:
    """(bits, format) pairs the budget solver considers under a `scheme` option, in table order."""
    if scheme not in scheme_options():
        raise ConfigError(f"scheme must be one of {sorted(scheme_options())}, got {scheme!r}")
    return tuple((bits, fmt.name) for fmt in FORMATS.values() for bits in fmt.candidates.get(scheme, ()))


def default_granularity(scheme: str, bits: int, group_asked: bool = False) -> str | None:
    """The format's granularity for this width ("channel", "group"), or None: a group of `group_size`."""
    return get_format(scheme).granularity(bits, group_asked)


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
        raise ConfigError(
            f"{where}: group_size must be an integer in 1..{k} (the input size K), got {group_size!r}"
        )
    return group_size


def check_bits(scheme: str, bits: int, symmetric: bool, where: str = "weight") -> None:
    fmt = get_format(scheme)
    if fmt.fit is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in fmt.bits_allowed:
        raise ConfigError(f"{where}: {scheme} weights need bits in {list(fmt.bits_allowed)}, got {bits!r}")
    problem = fmt.check(bits, symmetric)
    if problem:
        raise ConfigError(f"{where}: {problem}")


def weight_bytes(
    shape: tuple[int, int],
    bits: int | None,
    scheme: str = "uniform",
    granularity: str = "channel",
    group_size: int | None = None,
    symmetric: bool = True,
) -> int:
    """Exact deployed bytes of an [N, K] weight in this format (equals QuantizedWeight.nbytes())."""
    n, k = shape
    fmt = get_format(scheme)
    if bits is None or fmt.fit is None:
        return 4 * n * k
    gs = resolve_group_size(granularity, group_size, k)
    g = math.ceil(k / gs)
    t = fmt.num_tables(bits, n, g, symmetric, granularity)
    index_bytes = 0 if t == 1 else n * g * (1 if t <= 256 else 2)
    return math.ceil(n * k * bits / 8) + n * g * 4 + t * (1 << bits) + index_bytes


def _check_weight(w: torch.Tensor, where: str) -> torch.Tensor:
    if w.dim() < 2:
        raise ConfigError(f"{where}: weight must be at least 2-D [N, K...], got shape {tuple(w.shape)}")
    w2 = w.detach().reshape(w.shape[0], -1).float()
    if w2.numel() == 0:
        raise ConfigError(
            f"{where}: weight has a zero-size dimension {tuple(w.shape)}; remove the layer "
            f"or keep it in float with a rule {{'float': True}}"
        )
    if not torch.isfinite(w2).all():
        bad = int((~torch.isfinite(w2)).sum())
        raise ConfigError(
            f"{where}: weight contains {bad} NaN/Inf values; fix the checkpoint before quantizing"
        )
    return w2


def quantize_weight(
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
    """Quantize weight [N, K...] (flattened to [N, K]) into a QuantizedWeight.

    hdiag [K]: input-channel energy (weights the k-means and the clip search); hessian [K, K]:
    E[x x^T], required for rounding="gptq". `where` names the node in error messages.
    """
    if get_format(scheme).fit is None:
        raise ConfigError(f"{where}: scheme {scheme!r} is not quantized; skip the node instead")
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
            raise ConfigError(
                f"{where}: calibration statistics have {hdiag.numel()} input channels but the "
                f"weight has K={k}; re-run calibrate on this graph"
            )

    def fit_block(blk: torch.Tensor, start: int) -> Grid:
        wt = None if hdiag is None else hdiag[start : start + blk.shape[1]]
        if granularity == "tensor":
            flat = blk.reshape(1, -1)
            wt_flat = None if wt is None else wt.expand(blk.shape[0], -1).reshape(1, -1)
            return fmt.fit(flat, bits, symmetric, wt_flat).expand(blk.shape[0])
        return fmt.fit(blk, bits, symmetric, wt)

    if rounding == "gptq":
        if hessian is None:
            raise ConfigError(
                f"{where}: rounding='gptq' needs the input second moments H; run the calibrate "
                f"pass first (or use rounding='nearest')"
            )
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
    return Grid(
        torch.stack([g.scale for g in grids], 1).reshape(-1),
        torch.stack([g.levels for g in grids], 1).reshape(-1, grids[0].levels.shape[1]),
        torch.stack([g.table_id for g in grids], 1).reshape(-1),
    )


def _nearest_groups(
    fmt: Format, w: torch.Tensor, bits: int, symmetric: bool, gs: int, hdiag: torch.Tensor | None
) -> tuple[torch.Tensor, Grid]:
    """Nearest rounding of every group of w [N, K] in one call (and one for a partial last group)."""
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


def _assemble(
    scheme: str, bits: int, symmetric: bool, granularity: str, gs: int, codes: torch.Tensor, grid: Grid
) -> QuantizedWeight:
    """Pack the (row, group) grids (N*G rows, row-major) + codes into the QuantizedWeight contract."""
    n = codes.shape[0]
    g = grid.scale.numel() // n
    scales = grid.scale.reshape(n, g).float()
    table, table_index = get_format(scheme).tables(bits, symmetric, granularity, grid, n, g)
    return QuantizedWeight(
        bits=bits,
        codes=codes.to(torch.uint8),
        table=table.to(torch.int8),
        table_index=table_index.contiguous(),
        scales=scales.contiguous(),
        group_size=gs,
        scheme=scheme,
        granularity=granularity,
    )


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(||ref||^2 / ||ref - approx||^2) (inf when exact)."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10 * math.log10(max(signal, 1e-300) / noise)
