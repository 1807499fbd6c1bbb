"""fxquant.kv_rows: per-row int8 keys/values (the torch and C paths give the same bits) and the memo."""
from __future__ import annotations

import pytest
import torch

from fxquant.codegen import TARGETS
from fxquant.codegen.kv_quant import row_quantizer
from fxquant.kv_rows import RowsMemo, quantize_rows
from fxquant.qweight import quantize_activation_per_row

QUANTIZER = [None] + [pytest.param(t, marks=pytest.mark.skipif(not TARGETS[t].runnable(), reason=f"no {t}"))
                      for t in ("portable", "avx512")]


def _rows(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * 3
    flat = t.view(-1, shape[-1])
    flat[0] = 0.0                                   # a zero row: scale 1, codes 0
    flat[1, 0] = float("nan")                       # a NaN row: NaN scale, as quantize_activation_per_row
    flat[2, -1] = float("inf")
    return t


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("target", QUANTIZER)
@pytest.mark.parametrize("layout", ["6d", "4d-view", "6d-strided", "2d"])
def test_the_bits_of_quantize_activation_per_row(target, layout):
    quant = row_quantizer(target) if target else None
    base = _rows((2, 3, 2, 4, 9, 16))                 # Whisper's cross cache layout (B, layers, k/v, H, A, D)
    t = {"6d": base, "4d-view": base[:, 1, 0], "6d-strided": base.transpose(3, 4),
         "2d": base.reshape(-1, 16)}[layout]
    got = quantize_rows(t, quant)
    assert got[0].shape == t.shape and got[1].shape == (*t.shape[:-1], 1)
    assert _same(got, quantize_activation_per_row(t))


@pytest.mark.parametrize("target", QUANTIZER)
def test_out_writes_one_window_of_a_batch_buffer(target):
    quant = row_quantizer(target) if target else None
    t = _rows((3, 2, 2, 4, 9, 16), seed=1)
    codes, scales = torch.zeros(t.shape, dtype=torch.int8), torch.zeros(*t.shape[:-1], 1)
    for i in range(3):
        out = quantize_rows(t[i:i + 1], quant, out=(codes[i:i + 1], scales[i:i + 1]))
        assert out[0].data_ptr() == codes[i:i + 1].data_ptr()
    assert _same((codes, scales), quantize_activation_per_row(t))


def test_bad_inputs_say_what_is_expected():
    with pytest.raises(ValueError, match="expects a float tensor"):
        quantize_rows(torch.ones(3, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="out must be contiguous int8"):
        quantize_rows(torch.randn(3, 4), out=(torch.empty(3, 4, dtype=torch.int8), torch.empty(3, 4)))


def test_memo_reuses_until_the_tensor_changes():
    memo, t = RowsMemo(), torch.randn(2, 5, 8)
    first = memo.get("k", t)
    assert memo.get("k", t) is first and memo.get("k", t[:]) is first        # a view of the same memory too
    assert memo.get("k", t.clone()) is not first                             # another tensor: converted
    again = memo.get("k", t)
    t.add_(1)                                                                # written in place
    assert memo.get("k", t) is not again and _same(memo.get("k", t), quantize_activation_per_row(t))
    memo.clear()
    assert memo._slots == {}
