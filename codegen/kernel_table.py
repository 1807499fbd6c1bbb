"""Kernel table: which template renders, and which function packs, a weight format on a target.

Two lookups choose a linear kernel: the weight format's kernel family (`fxquant.formats.FORMATS[scheme]
.kernel`, e.g. "lut": expand codes through the int8 level table) and the target's template family
(`codegen.targets.TARGETS[name].family`: "avx512" or "portable"; "f32" for weight-only ops, whose
activations stay float). Every format of the LUT contract shares the "lut" row; a format with kernels
of its own adds one row here, its templates and its packing function.

Example:
    >>> entry = kernel_for("codebook", "avx512")
    >>> entry.template, entry.pack.__name__
    ('linear_avx512.c.j2', 'pack_lut_avx512')
    >>> kernel_for("float", "portable")
    Traceback (most recent call last):
    ...
    fxquant.codegen.kernel_table.UnsupportedOp: weight format 'float' has no generated kernel (it runs in \
torch); kernel families: ['lut']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fxquant.formats import get_format
from fxquant.qweight import QuantizedWeight

from .packing import LITERAL_MAX_BYTES, Packed, TableInfo, pack_avx512, pack_portable


class UnsupportedOp(ValueError):
    """This op/format has no kernel on the requested target (message says what to use instead)."""


@dataclass(frozen=True)
class KernelEntry:
    """A template (in codegen/templates) and `pack(qw, table_info | None) -> Packed` for its calls."""

    template: str
    pack: Callable[[QuantizedWeight, TableInfo | None], Packed]


def pack_lut_avx512(qw: QuantizedWeight, info: TableInfo | None) -> Packed:
    return pack_avx512(qw, info)


def pack_lut_portable(qw: QuantizedWeight, info: TableInfo | None = None) -> Packed:
    return pack_portable(qw, literal_levels=qw.table.numel() <= LITERAL_MAX_BYTES)


KERNELS: dict[str, dict[str, KernelEntry]] = {
    "lut": {
        "avx512": KernelEntry("linear_avx512.c.j2", pack_lut_avx512),
        "portable": KernelEntry("linear_portable.c.j2", pack_lut_portable),
        "f32": KernelEntry("linear_f32.c.j2", pack_lut_portable),
    },
}


def kernel_for(scheme: str, family: str) -> KernelEntry:
    """The kernel entry of a weight format on a template family; UnsupportedOp when there is none."""
    kernel = get_format(scheme).kernel
    if kernel is None:
        raise UnsupportedOp(
            f"weight format {scheme!r} has no generated kernel (it runs in torch); kernel "
            f"families: {sorted(KERNELS)}"
        )
    rows = KERNELS.get(kernel)
    if rows is None or family not in rows:
        have = sorted(rows) if rows else []
        raise UnsupportedOp(
            f"weight format {scheme!r} (kernel family {kernel!r}) has no {family!r} kernel "
            f"(it has {have}); use target='portable' or target='reference'"
        )
    return rows[family]
