"""Embedding lookups into a low-bit table as one generated C function (templates/embedding_rows.c.j2).

`embedding_rows(target)(op, tokens)` returns what `fxquant.ops.LowbitEmbedding`'s torch path returns, bit for
bit: rows `tokens` of the op's table, dequantized, without unpacking any other row. The torch path takes
5-10 small ops per call; Whisper's decoder looks up its token table once per step in each of its six row
blocks (fxquant.models.token_blocks), which cost about 0.75 ms of a 4.5 ms tiny.en step at batch 8.
`attach_kernels` gives every LowbitEmbedding this function (backend "c:<target>").

Example:
    >>> import torch
    >>> from fxquant.formats import quantize_weight
    >>> from fxquant.ops import LowbitEmbedding
    >>> op = LowbitEmbedding(quantize_weight(torch.randn(100, 64), 4, "codebook", "channel"))
    >>> rows = embedding_rows("portable")                                           # doctest: +SKIP
    >>> torch.equal(rows(op, torch.tensor([[3, 99]])), op(torch.tensor([[3, 99]])))  # doctest: +SKIP
    True
"""
from __future__ import annotations

import ctypes

import torch

from .kernel_base import _Kernel, target_kernel
from .render import UnsupportedOp
from .targets import Target

__all__ = ["EmbeddingRows", "embedding_rows", "serves"]

_VP = ctypes.c_void_p


def serves(op) -> str | None:
    """None when the kernel can serve `op` (codes as the pack_bits stream, K a multiple of 8, int32 table
    index, float32 scales, int8 tables with a level for every code), else why not."""
    codes = op.packed_codes
    n, k = codes.shape
    groups = op.scales.shape[-1] if op.scales.dim() == 2 else 0
    if codes.layout != "bits" or k % 8:
        return f"codes held as {codes.layout!r} with K={k} (needs the bit stream, K a multiple of 8)"
    if not all(t.is_contiguous() for t in (codes.data, op.table, op.table_index, op.scales)):
        return "codes, table, table index or scales are not contiguous"
    if op.table.dtype != torch.int8 or op.table.dim() != 2 or op.table.shape[1] < 1 << op.bits:
        return f"table {op.table.dtype} {tuple(op.table.shape)} (needs int8 [tables, >= 2**bits])"
    if op.table_index.dtype != torch.int32 or tuple(op.table_index.shape) != (n, groups) \
            or op.scales.dtype != torch.float32 or tuple(op.scales.shape) != (n, groups) \
            or groups != -(-k // op.group_size):
        return "table index / scales are not int32 / float32 [rows, groups]"
    return None


class EmbeddingRows(_Kernel):
    """out float32 [*tokens.shape, K] = rows `tokens` of a LowbitEmbedding's table, dequantized."""

    def __init__(self, name: str, target: Target, source: str, lib: ctypes.CDLL):
        super().__init__(name, target, source)
        self._fn = lib.fx_embedding_rows
        self._fn.argtypes = [_VP] * 7
        self._fn.restype = ctypes.c_int64

    def __call__(self, op, tokens: torch.Tensor) -> torch.Tensor:
        if not self.runnable:
            self._check()
        if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise TypeError(f"{self.name}: tokens must be an integer tensor, got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
        checked = op.__dict__.get("_rows_checked")
        key = (op.table_index.data_ptr(), op.table_index._version, op.table.data_ptr(), op.table._version)
        if checked != key:               # table indices in range: once per table index / table contents
            why = serves(op)
            if why is None and op.table_index.numel() and (int(op.table_index.min()) < 0 or
                                                           int(op.table_index.max()) >= op.table.shape[0]):
                why = "table index out of range"
            if why is not None:
                raise UnsupportedOp(f"{self.name}: {why}")
            op.__dict__["_rows_checked"] = key
        n, k = op.packed_codes.shape
        flat = tokens.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty((*tokens.shape, k), dtype=torch.float32)
        dims = (ctypes.c_int64 * 7)(n, k, op.bits, op.table.shape[1], op.scales.shape[1], op.group_size,
                                    flat.numel())
        bad = self._fn(op.packed_codes.data.data_ptr(), ctypes.addressof(dims), op.table.data_ptr(),
                       op.table_index.data_ptr(), op.scales.data_ptr(), flat.data_ptr(), out.data_ptr())
        if bad:
            raise IndexError(f"token {int(flat[bad - 1])} is out of range for an embedding of {n} rows")
        return out


def embedding_rows(target: str | Target = "native", cache_dir: str | None = None) -> EmbeddingRows:
    """The embedding-row kernel for a target ("avx512" | "avx2" | "portable" | "native" or a Target), built
    once per process (and cached on disk by content hash)."""
    return target_kernel(EmbeddingRows, "embedding_rows.c.j2", target, cache_dir)
