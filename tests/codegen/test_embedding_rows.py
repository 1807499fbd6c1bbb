"""The generated embedding-row kernel (codegen/embedding_rows.py) vs LowbitEmbedding's torch path, bit for
bit: every format and width, group sizes that do and do not divide K, token shapes and edge rows, errors, and
attach_kernels giving it to the lookups of a compiled tied-embedding model."""
from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
from torch import nn

import fxquant
from fxquant.codegen import TARGETS
from fxquant.codegen.attach import attach_kernels
from fxquant.codegen.embedding_rows import embedding_rows, serves
from fxquant.formats import quantize_weight
from fxquant.ops import LowbitEmbedding
from fxquant.qweight import PackedCodes

RUNNABLE = [t for t in ("avx512", "avx2", "portable") if TARGETS[t].runnable()]
TARGET_PARAMS = [pytest.param(t, marks=pytest.mark.skipif(t not in RUNNABLE, reason=f"host cannot run {t}"))
                 for t in ("portable", "avx2", "avx512")]
# (bits, scheme, granularity, group): uniform per channel / per group and codebooks, 2..8 bits
FORMATS = [(8, "uniform", "channel", None), (6, "uniform", "channel", None), (5, "uniform", "channel", None),
           (4, "uniform", "group", 64), (3, "uniform", "group", 32), (2, "uniform", "group", 32),
           (4, "codebook", "channel", None), (3, "codebook", "channel", None), (2, "codebook", "group", 64)]
SHAPES = [(37, 8), (100, 24), (64, 96), (300, 384)]        # K a multiple of 8; a group of 64 cuts 96 at 64


def kernel_jobs() -> list:
    """Zero-argument callables that build the kernels the tests use (tests/codegen/prebuild.py)."""
    return [partial(embedding_rows, t) for t in RUNNABLE]


def _op(n: int, k: int, fmt, seed: int = 0) -> LowbitEmbedding:
    bits, scheme, gran, group = fmt
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 3, n)[:, None]
    return LowbitEmbedding(quantize_weight(w, bits, scheme, gran, *([min(group, k)] if group else [])))


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("fmt, shape", list(itertools.product(FORMATS, SHAPES)))
def test_rows_equal_the_torch_path(target, fmt, shape):
    op = _op(*shape, fmt)
    rows = embedding_rows(target)
    n = shape[0]
    for tokens in (torch.tensor([0, n - 1]), torch.randint(0, n, (3, 5)), torch.tensor(n // 2),
                   torch.randint(0, n, (2, 1), dtype=torch.int32), torch.zeros(0, 3, dtype=torch.long)):
        got = rows(op, tokens)
        assert got.shape == (*tokens.shape, shape[1]) and got.dtype == torch.float32
        assert torch.equal(got, op.reference(tokens))


@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_bad_tokens_are_errors_and_write_nothing(target):
    op, rows = _op(50, 16, FORMATS[6]), embedding_rows(target)
    with pytest.raises(IndexError, match="token 50 is out of range for an embedding of 50 rows"):
        rows(op, torch.tensor([3, 50, 1]))
    with pytest.raises(IndexError, match="token -1 is out of range"):
        rows(op, torch.tensor([[-1]]))
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        rows(op, torch.tensor([1.0]))


def test_ops_it_cannot_serve_say_why():
    op = _op(40, 12, FORMATS[3])                              # K = 12: rows do not end on a byte
    assert "K a multiple of 8" in serves(op)
    op = _op(40, 16, FORMATS[6])
    codes = op.codes
    op._set_codes(PackedCodes(codes.clone(), codes.shape, op.bits, layout="unpacked", unpack_fn=lambda d: d))
    assert "'unpacked'" in serves(op)
    op = _op(40, 16, FORMATS[6])
    op.table_index[3, 0] = 10_000                             # an index past the tables: refused, not read
    with pytest.raises(fxquant.codegen.UnsupportedOp, match="table index out of range"):
        embedding_rows(RUNNABLE[-1])(op, torch.tensor([1]))


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 96, d: int = 32):
        super().__init__()
        self.emb, self.mid = nn.Embedding(vocab, d), nn.Linear(d, d)

    def forward(self, tokens):
        return self.mid(self.emb(tokens)) @ self.emb.weight.t()


def test_attach_gives_lookups_the_kernel_and_reference_takes_it_back():
    torch.manual_seed(0)
    model, tokens = TiedLM().eval(), torch.randint(0, 96, (2, 5))
    cm = fxquant.compile_lowbit(model, (tokens,), bits=4)
    lookups = [m for m in cm.graph_module.modules() if isinstance(m, LowbitEmbedding)]
    assert lookups and all(m.backend.startswith("c:") and m.kernel is not None for m in lookups)
    out = cm(tokens)
    kernels = [m.kernel for m in lookups]
    for m in lookups:                                           # the lookups alone on their torch path
        m.kernel = None
    assert torch.equal(cm(tokens), out)
    for m, kernel in zip(lookups, kernels):
        m.kernel = kernel
    report = attach_kernels(cm.graph_module, target="reference")
    assert all(m.kernel is None and m.backend == "reference" for m in lookups)
    assert set(report.backends.values()) == {"reference"}
