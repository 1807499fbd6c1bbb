"""qweight: bit packing (the artifact layout), PackedCodes, exact levels / accumulators fast paths."""
import numpy as np
import pytest
import torch

from fxquant.formats import quantize_weight
from fxquant.qweight import (PackedCodes, QuantizedWeight, dequantize, group_accumulators, pack_bits,
                             quantize_activation_per_row, unpack_bits)

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_stream(codes: torch.Tensor, bits: int) -> bytes:
    """The layout spelled out bit by bit: code i occupies stream bits [i*b, (i+1)*b), little-endian."""
    stream = np.zeros(-(-codes.numel() // 8) * 8 * bits, dtype=np.uint8)
    for i, c in enumerate(codes.tolist()):
        for t in range(bits):
            stream[i * bits + t] = (c >> t) & 1
    return np.packbits(stream, bitorder="little").tobytes()


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("numel", [1, 8, 13, 1000])
def test_pack_bits_is_the_little_endian_stream_and_round_trips(bits, numel):
    codes = torch.randint(0, 1 << bits, (numel,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // 8) * bits
    assert bytes(packed.numpy()) == _reference_stream(codes, bits)
    assert torch.equal(unpack_bits(packed, bits, numel), codes)


def test_pack_bits_known_bytes_and_bad_input():
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 4).tolist() == [0x21, 0x03, 0, 0]
    assert pack_bits(torch.tensor([7, 0, 5], dtype=torch.uint8), 3).tolist() == [0b01000111, 0b00000001, 0]
    with pytest.raises(ValueError, match="need 12 uint8 bytes"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), 3, 30)


def test_packed_codes_rows_unpack_and_shared_tensor():
    codes = torch.randint(0, 8, (37, 24), dtype=torch.uint8)
    pc = PackedCodes.from_codes(codes.clone(), 3)  # the clone dies: unpack() really unpacks
    assert pc.nbytes == 37 * 24 * 3 // 8 and pc.shape == (37, 24)
    idx = torch.tensor([[3, 0], [36, 3]])
    assert torch.equal(pc.rows(idx), codes[idx])  # only those rows unpacked
    first = pc.unpack()
    assert torch.equal(first, codes) and pc.unpack() is first  # one tensor while it is alive
    odd = PackedCodes.from_codes(codes[:, :21].contiguous(), 3)  # rows not byte aligned: full unpack
    assert torch.equal(odd.rows(idx), codes[:, :21][idx])
    with pytest.raises(ValueError, match="needs its unpack function"):
        PackedCodes(pc.data, (37, 24), 3, layout="avx512")


def _slow_levels(qw: QuantizedWeight) -> torch.Tensor:
    k = qw.codes.shape[1]
    idx = qw.table_index.long().repeat_interleave(qw.group_size, dim=1)[:, :k]
    return qw.table.long()[idx, qw.codes.long()].to(torch.int8)


@pytest.mark.parametrize(
    "scheme,gran,sym",
    [
        ("uniform", "group", True),
        ("uniform", "group", False),
        ("uniform", "tensor", False),
        ("codebook", "group", True),
        ("codebook", "channel", True),
    ],
)
def test_levels_dequantize_and_accumulators_match_the_definition(scheme, gran, sym):
    w = torch.randn(24, 200)
    qw = quantize_weight(w, 4, scheme, gran, 64 if gran == "group" else None, sym)
    assert torch.equal(qw.levels(), _slow_levels(qw))
    scales = qw.scales.repeat_interleave(qw.group_size, dim=1)[:, :200]
    assert torch.equal(dequantize(qw), _slow_levels(qw).float() * scales)
    xq, _ = quantize_activation_per_row(torch.randn(5, 200))
    xp = torch.nn.functional.pad(xq.double(), (0, qw.num_groups * qw.group_size - 200))
    wp = torch.nn.functional.pad(_slow_levels(qw).double(), (0, qw.num_groups * qw.group_size - 200))
    exact = torch.einsum("mgk,ngk->mng", xp.view(5, qw.num_groups, -1), wp.view(24, qw.num_groups, -1)).long()
    assert torch.equal(group_accumulators(xq, qw), exact)


def test_accumulators_exact_at_the_int8_extremes():
    """float32 BLAS is used only while every partial sum stays below 2^24: -128 * -127 * 1000 is exact."""
    k = 1000
    qw = QuantizedWeight(
        8,
        torch.zeros(2, k, dtype=torch.uint8),
        torch.full((1, 256), -128, dtype=torch.int8),
        torch.zeros(2, 1, dtype=torch.int32),
        torch.ones(2, 1),
        k,
        "codebook",
        "channel",
    )
    xq = torch.full((1, k), -127, dtype=torch.int8)
    assert group_accumulators(xq, qw).tolist() == [[[127 * 128 * k], [127 * 128 * k]]]
