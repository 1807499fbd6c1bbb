"""codegen.pack_cache: the avx512 code streams kept on disk equal fresh packing, damaged entries are rebuilt,
and a kernel built from a cached stream computes exactly what one packed from the codes computes."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from fxquant.codegen import TARGETS, compile_op
from fxquant.codegen import pack_cache
from fxquant.codegen.packing import avx512_code_bytes, pack_avx512, pack_avx512_codes
from fxquant.qweight import PackedCodes

from .codegen_cases import make_input, make_linear, make_qweight

AVX512 = TARGETS["avx512"].runnable()
# (N, K, bits, group): rows and groups off the 16-row blocks and 16-input superblocks, every plane layout
CASES = [(16, 32, 4, 32), (13, 70, 3, 32), (40, 96, 5, None), (33, 64, 2, 16), (17, 50, 8, 25),
         (64, 128, 6, 64), (5, 24, 7, None)]


def kernel_jobs() -> list:
    """The avx512 kernels the tests below build (tests/codegen/prebuild.py)."""
    if not AVX512:
        return []
    return [partial(compile_op, make_linear(n, k, b, g, "asym", seed=n), "avx512") for n, k, b, g in CASES]


@pytest.mark.parametrize("n,k,bits,group", CASES)
def test_cached_stream_equals_fresh_packing(tmp_path, n, k, bits, group):
    qw = make_qweight(n, k, bits, group, "asym", seed=n)
    codes = PackedCodes.from_codes(qw.codes, bits)
    fresh = pack_avx512_codes(qw.codes, bits, qw.group_size)
    assert fresh.numel() == avx512_code_bytes((n, k), bits, qw.group_size)
    assert torch.equal(fresh, pack_avx512(qw).codes)
    built = []

    def build():
        built.append(1)
        return pack_avx512_codes(qw.codes, bits, qw.group_size)

    first = pack_cache.cached_codes(codes, qw.group_size, build, str(tmp_path))
    second = pack_cache.cached_codes(codes, qw.group_size, build, str(tmp_path))
    assert built == [1] and torch.equal(first, fresh) and torch.equal(second, fresh)
    other = PackedCodes.from_codes(qw.codes ^ 1 if bits > 1 else qw.codes, bits)      # other codes: other key
    assert pack_cache.cache_key(other, qw.group_size) != pack_cache.cache_key(codes, qw.group_size)
    assert pack_cache.cache_key(codes, qw.group_size + 1) != pack_cache.cache_key(codes, qw.group_size)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty", "longer"])
def test_damaged_entries_are_rebuilt(tmp_path, damage):
    qw = make_qweight(20, 64, 4, 32, "sym", seed=3)
    codes = PackedCodes.from_codes(qw.codes, 4)
    build = partial(pack_avx512_codes, qw.codes, 4, 32)
    pack_cache.cached_codes(codes, 32, build, str(tmp_path))
    (path,) = (tmp_path / "packed").iterdir()
    blob = bytearray(path.read_bytes())
    if damage == "truncated":
        blob = blob[:-5]
    elif damage == "flipped byte":
        blob[40] ^= 0x10
    elif damage == "empty":
        blob = bytearray()
    else:
        blob += b"\0"
    path.write_bytes(bytes(blob))
    built = []
    got = pack_cache.cached_codes(codes, 32, lambda: built.append(1) or build(), str(tmp_path))
    assert built == [1] and torch.equal(got, build())
    assert pack_cache.cached_codes(codes, 32, lambda: pytest.fail("rewritten entry unused"), str(tmp_path)) \
        .equal(got)


def test_codes_in_a_kernel_layout_are_not_cached(tmp_path):
    qw = make_qweight(16, 32, 4, 32)
    kernel_layout = pack_avx512(qw).packed_codes
    assert kernel_layout.layout == "avx512" and pack_cache.cache_key(kernel_layout, 32) is None
    build = partial(pack_avx512_codes, qw.codes, 4, 32)
    got = pack_cache.cached_codes(kernel_layout, 32, build, str(tmp_path))
    assert torch.equal(got, pack_avx512(qw).codes) and not (tmp_path / "packed").exists()


def test_wrong_stream_is_refused():
    qw = make_qweight(16, 32, 4, 32)
    with pytest.raises(ValueError, match="code stream"):
        pack_avx512(qw, codes=torch.zeros(7, dtype=torch.uint8))


@pytest.mark.skipif(not AVX512, reason="host cannot run avx512 kernels")
@pytest.mark.parametrize("n,k,bits,group", CASES)
def test_kernel_from_a_cached_stream_is_the_same(monkeypatch, tmp_path, n, k, bits, group):
    """compile_op with the cache (cold, then warm) and without it: the same outputs bit for bit, and the op's
    codes (now read back from the kernel's copy) are the original ones."""
    monkeypatch.setattr(pack_cache, "_path", lambda key, cache: tmp_path / "packed" / f"{key}.bin")
    x = make_input(9, k)
    outs, codes = [], []
    for enabled in (False, True, True):
        monkeypatch.setattr(pack_cache, "ENABLED", enabled)
        op = make_linear(n, k, bits, group, "asym", seed=n)
        want = op.codes.clone()
        op.kernel = compile_op(op, "avx512")
        outs.append(op(x))
        codes.append(torch.equal(op.codes, want))
    assert all(codes) and torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert len(list((tmp_path / "packed").iterdir())) == 1
