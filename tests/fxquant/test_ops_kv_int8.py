"""FusedAttention's int8 keys/values: the fast per-row quantizer equals the reference one bit for bit."""
from __future__ import annotations

import pytest
import torch

from fxquant.kv_rows import kv_int8_per_row
from fxquant.ops import FusedAttention
from fxquant.qweight import quantize_activation_per_row


def _special(shape, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 10
    flat = t.view(-1, shape[-1])
    flat[0] = 0.0                                     # a zero row: scale 1
    flat[1, 3] = float("nan")                         # a NaN row: NaN scale
    flat[2, 0], flat[3, :2] = float("inf"), -float("inf")
    flat[4] = 127.5 / 127 * torch.arange(shape[-1]) - 3   # values on rounding ties after scaling
    flat[5] = -flat[5].abs()                          # all negative: the max magnitude is the minimum
    return t


@pytest.mark.parametrize("shape", [(8, 4), (6, 7), (2, 3, 6, 64), (1, 6, 1500, 64)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided", "float64"])
def test_fast_per_row_int8_equals_the_reference(shape, layout):
    t = _special(shape, sum(shape))
    if layout == "transposed":
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided":
        t = torch.cat([t, t], -1)[..., ::2]
    elif layout == "float64":
        t = t.double()
    (q, s), (rq, rs) = kv_int8_per_row(t), quantize_activation_per_row(t)
    assert torch.equal(q, rq)
    assert torch.equal(torch.isnan(s), torch.isnan(rs))
    assert torch.equal(s.nan_to_num(-1.0), rs.nan_to_num(-1.0))


def test_attention_with_int8_kv_matches_its_reference():
    att = FusedAttention(head_dim=16, kv_int8=True)
    q, k, v = torch.randn(2, 3, 1, 16), torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 16)
    assert torch.equal(att(q, k, v), att.reference(q, k, v))


def test_forget_constant_kv_drops_the_int8_copies(monkeypatch):
    import fxquant.kv_rows as kv_rows
    from fxquant.asr.decoding import _forget_constant_kv

    calls = []
    real = kv_rows.kv_int8_per_row
    monkeypatch.setattr(kv_rows, "kv_int8_per_row", lambda t: calls.append(1) or real(t))
    att = FusedAttention(head_dim=8, kv_int8=True)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    first = att(q, k, v)
    assert torch.equal(att(q, k, v), first) and len(calls) == 2          # k and v once: memo hits after
    step = torch.nn.Sequential(att)
    _forget_constant_kv(step)
    assert att._kv_memo._slots == {}
    assert torch.equal(att(q, k, v), first) and len(calls) == 4          # recomputed, the same numbers
    _forget_constant_kv(lambda *a: None)                  # an fp32 step (a function): nothing to do
