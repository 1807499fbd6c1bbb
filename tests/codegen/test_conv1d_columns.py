"""1-D convs (groups 1, no dilation) build their im2col columns from a strided window view: the same
columns as F.unfold, so the same outputs bit for bit, over a sweep of kernel sizes, strides, paddings and
lengths (down to one output step), batch sizes, non-contiguous inputs and 8/4-bit activations."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fxquant.codegen import TARGETS, compile_op

from .codegen_cases import assert_close
from .test_conv_attach import make_conv

RUNNABLE = [t for t in ("avx512", "portable") if TARGETS[t].runnable()]


def _unfold_columns(x: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    """The columns as the 2-D unfold path builds them: [B, L, C*k]."""
    cols = F.unfold(x.float().unsqueeze(2), (1, k), padding=(0, p), stride=(1, s))
    return cols.transpose(1, 2).contiguous()


SWEEP = [  # (cin, cout, k, stride, padding, length)
    (c, n, k, s, p, length)
    for (c, n), k, s, p in itertools.product([(5, 7), (80, 24)], [1, 2, 3, 5], [1, 2, 3], [0, 1, 2])
    for length in {max(1, k - 2 * p), k - 2 * p + s + 1, 37}
    if length >= 1 and length + 2 * p >= k
]


@pytest.mark.parametrize("target", RUNNABLE)
@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_conv1d_columns_match_unfold_bit_for_bit(target, case):
    cin, cout, k, s, p, length = case
    op = make_conv(cin, cout, (k,), (s,), (p,), (1,), 1, 8, "gelu")
    kern = compile_op(op, target)
    x = torch.randn(2, cin, length)
    y = kern(x)
    want = kern.linear(_unfold_columns(x, k, s, p)).transpose(1, 2)
    assert torch.equal(y, want), case
    assert_close(y, op.reference(x), f"{kern.name} {case}")


@pytest.mark.parametrize("target", RUNNABLE)
def test_conv1d_reads_transposed_inputs_and_float_activations(target):
    """A [B, T, C] tensor seen as [B, C, T] (Whisper's conv1 output feeding conv2), batch 3, and
    act_bits None (float activations)."""
    for act_bits in (8, None):
        op = make_conv(16, 12, (3,), (2,), (1,), (1,), 1, act_bits, None)
        kern = compile_op(op, target)
        x = torch.randn(3, 41, 16).transpose(1, 2)
        assert not x.is_contiguous()
        assert torch.equal(kern(x), kern(x.contiguous()))
        assert_close(kern(x), op.reference(x), f"{kern.name} act_bits={act_bits}")


@pytest.mark.parametrize("target", RUNNABLE)
def test_conv1d_input_shorter_than_its_kernel_is_an_error(target):
    kern = compile_op(make_conv(4, 6, (5,), (1,), (1,), (1,), 1, 8, None), target)
    with pytest.raises(ValueError, match="shorter than the kernel"):
        kern(torch.randn(1, 4, 2))
