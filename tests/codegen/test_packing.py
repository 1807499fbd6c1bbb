"""codegen.packing: the avx512 code layout (against a byte-by-byte reference), unpacking it back, portable."""
import math

import pytest
import torch

from fxquant.codegen.packing import PLANES, pack_avx512, pack_portable, padded_group, unpack_avx512
from fxquant.formats import quantize_weight

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_avx512_codes(codes: torch.Tensor, bits: int, gs: int) -> list[int]:
    """The layout as the module docstring states it, one superblock at a time."""
    n, k = codes.shape
    g, nb, gsp = math.ceil(k / gs), math.ceil(n / 16), padded_group(gs, 16)
    out = []
    for b in range(nb):
        for grp in range(g):
            for s in range(gsp // 16):
                quads = [[0] * 64 for _ in range(4)]
                for q in range(4):
                    for r in range(16):
                        for i in range(4):
                            row, col = 16 * b + r, s * 16 + 4 * q + i
                            k_idx = grp * gs + col
                            ok = row < n and col < gs and k_idx < k
                            quads[q][4 * r + i] = int(codes[row, k_idx]) if ok else 0
                shift = 0
                for width in PLANES[bits]:
                    v = [[(c >> shift) & ((1 << width) - 1) for c in quad] for quad in quads]
                    if width == 8:
                        out += v[0] + v[1] + v[2] + v[3]
                    elif width == 4:
                        out += [a | (c << 4) for a, c in zip(v[0], v[1])] + [
                            a | (c << 4) for a, c in zip(v[2], v[3])
                        ]
                    elif width == 2:
                        out += [v[0][j] | v[1][j] << 2 | v[2][j] << 4 | v[3][j] << 6 for j in range(64)]
                    else:
                        out += [
                            sum(v[q][8 * j + t] << t for t in range(8)) for q in range(4) for j in range(8)
                        ]
                    shift += width
    return out


@pytest.mark.parametrize("bits", range(2, 9))
def test_avx512_layout_matches_reference_and_unpacks(bits):
    qw = quantize_weight(torch.randn(20, 40), bits, "uniform", "group", 24)  # ragged rows, groups and K
    packed = pack_avx512(qw)
    assert packed.codes.tolist() == _reference_avx512_codes(qw.codes, bits, 24)
    assert torch.equal(unpack_avx512(packed.codes, (20, 40), bits, 24), qw.codes)
    pc = packed.packed_codes
    assert pc.layout == "avx512" and pc.data is packed.codes and torch.equal(pc.unpack(), qw.codes)


def test_codebook_and_affine_tables_and_portable_codes():
    cb = quantize_weight(torch.randn(33, 70), 3, "codebook", "group", 32)
    assert torch.equal(pack_avx512(cb).packed_codes.unpack(), cb.codes)
    asym = quantize_weight(torch.randn(17, 64), 4, "uniform", "group", 32, symmetric=False)
    packed = pack_avx512(asym)
    assert packed.aux is not None and torch.equal(packed.packed_codes.unpack(), asym.codes)
    port = pack_portable(cb, literal_levels=True)
    assert port.codes.shape == (33, 3 * 32) and torch.equal(port.packed_codes.unpack(), cb.codes)
