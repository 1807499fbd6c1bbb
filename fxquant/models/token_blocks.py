"""A tied token table stored as row blocks, so that a budget can give each block its own precision.

Whisper's token table W [V, D] is both the input embedding and the logits projection, and in tiny.en it is
54 % of the weights. Its rows are not equally important: Whisper's vocabulary is a byte-level BPE whose ids
follow the merge order, so low ids are the frequent pieces of text, the high ids rare ones, and the
timestamp tokens are never produced when transcribing without timestamps. `RowBlockEmbedding` keeps the
same table as contiguous row blocks [starts[i], starts[i+1]); each block is its own `nn.Embedding`, used
by the lookup and by `project` (the logits: one matmul per block, concatenated in id order), so a compile
sees one tied (embedding, linear) pair per block and the budget solver picks a format per block.
The outputs are bit-identical to the single table's.

Fake-quantized weights (benchmarks/STUDY-whisper-3bit.md protocol: 60 held-out LJ Speech clips, greedy,
only the table quantized, centered): the study's rows give 3-bit codebooks on every row +0.56 WER points
and 2-bit codebooks on every row +297 (loops); rows 0-8191 at 4 bits and the rest at 2 bits measured
+0.75 at 2.32 code bits, and choosing those 8192 rows by calibration-data importance instead of by id
+1.96 (516 calibration positions do not cover the scoring vocabulary).

Example:
    >>> emb = torch.nn.Embedding(10, 4)
    >>> blocks = RowBlockEmbedding(emb.weight, [0, 3, 8, 10])
    >>> tokens = torch.tensor([[0, 5, 9]])
    >>> torch.equal(blocks(tokens), emb(tokens))
    True
    >>> x = torch.randn(2, 4)
    >>> torch.allclose(blocks.project(x), x @ emb.weight.t())
    True
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

__all__ = ["RowBlockEmbedding", "split_token_table", "whisper_row_blocks"]


class RowBlockEmbedding(nn.Module):
    """An [V, D] embedding table held as row blocks [starts[i], starts[i+1]) (starts[0] = 0, last = V)."""

    def __init__(self, weight: torch.Tensor, starts: Sequence[int]):
        super().__init__()
        starts = [int(s) for s in starts]
        v = weight.shape[0]
        if len(starts) < 2 or starts[0] != 0 or starts[-1] != v or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"row block starts must rise strictly from 0 to {v} rows, got {starts}")
        self.starts = tuple(starts)
        self.parts = nn.ModuleList(nn.Embedding.from_pretrained(weight.detach()[a:b].clone(), freeze=True)
                                   for a, b in zip(starts, starts[1:]))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = None
        for part, a, b in zip(self.parts, self.starts, self.starts[1:]):
            inside = torch.logical_and(tokens >= a, tokens < b).unsqueeze(-1)
            rows = torch.where(inside, part((tokens - a).clamp(0, b - a - 1)), 0.0)
            out = rows if out is None else out + rows         # exactly one block is non-zero per token
        return out

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T, one matmul per block, concatenated in id order."""
        return torch.cat([torch.matmul(x, p.weight.to(x.dtype).t()) for p in self.parts], dim=-1)

    def extra_repr(self) -> str:
        return f"blocks at rows {list(self.starts)}"


def whisper_row_blocks(n_vocab: int, eot: int, timestamp_begin: int,
                       text_starts: Sequence[int] = (2048, 8192, 16384)) -> list[int]:
    """Block starts for a Whisper vocabulary: text ids cut at `text_starts` (frequent to rare by BPE merge
    order), the special tokens [eot, timestamp_begin), and the timestamps [timestamp_begin, n_vocab).

    >>> whisper_row_blocks(51864, 50256, 50363)
    [0, 2048, 8192, 16384, 50256, 50363, 51864]
    """
    if not 0 < eot < timestamp_begin <= n_vocab:
        raise ValueError(f"expected 0 < eot ({eot}) < timestamp_begin ({timestamp_begin}) <= n_vocab ({n_vocab})")
    cuts = [s for s in text_starts if 0 < s < eot]
    return sorted({0, *cuts, eot, timestamp_begin, n_vocab})


def split_token_table(model, starts: Sequence[int], copy_model: bool = True):
    """A copy of a Whisper whose decoder token table is a RowBlockEmbedding (the caller's model is unchanged;
    copy_model=False changes a model that is already the caller's own copy in place and returns it)."""
    out = copy.deepcopy(model) if copy_model else model
    dec = out.decoder
    dec.token_embedding = RowBlockEmbedding(dec.token_embedding.weight, starts)
    return out
