"""Lowered ops keep one packed copy of their codes: bit-packed, or the attached kernel's own copy."""
import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch

import fxquant
from fxquant.codegen import TARGETS, compile_op
from fxquant.formats import quantize_weight
from fxquant.ops import LowbitConv, LowbitEmbedding, LowbitLinear

pytestmark = pytest.mark.usefixtures("one_thread")
NATIVE = "avx512" if TARGETS["avx512"].runnable() else "portable"


def _op(n=48, k=96, bits=4):
    return LowbitLinear(quantize_weight(torch.randn(n, k), bits, "uniform", "group", 32), torch.randn(n))


def test_codes_are_stored_bit_packed_and_unpack_exactly():
    qw = quantize_weight(torch.randn(48, 96), 3, "uniform", "group", 32)
    op = LowbitLinear(dataclasses.replace(qw, codes=qw.codes.clone()), None)    # that copy dies: op unpacks
    assert op.packed_codes.layout == "bits" and op.packed_codes.nbytes == 48 * 96 * 3 // 8
    assert "codes" not in op._buffers and op.code_shape == (48, 96)
    assert torch.equal(op.codes, qw.codes) and op.nbytes() == qw.nbytes()


def test_attached_kernel_copy_is_the_only_copy_and_reference_still_exact():
    op = _op()
    x = torch.randn(5, 96)
    codes, before = op.codes.clone(), op.reference(x)
    kernel = compile_op(op, NATIVE)
    op.kernel = kernel
    assert op.packed_codes is kernel.packed_codes and op.packed_codes.data is kernel.packed.codes
    assert torch.equal(op.codes, codes) and torch.equal(op.reference(x), before)
    op.kernel = None                                                    # detached: back to its own bit stream
    assert op.packed_codes.layout == "bits" and torch.equal(op.codes, codes)


def test_state_dict_and_register_buffer_take_unpacked_codes():
    op, other = _op(), _op()
    sd = op.state_dict()
    assert sd["codes"].shape == (48, 96) and sd["codes"].dtype == torch.uint8
    other.load_state_dict(sd)
    assert torch.equal(other.codes, op.codes)
    with pytest.raises(ValueError, match="uint8"):
        other.register_buffer("codes", torch.zeros(48, 96))


def test_embedding_lookup_unpacks_only_the_rows_it_needs():
    qw = quantize_weight(torch.randn(300, 64), 4, "uniform", "group", 32)
    emb = LowbitEmbedding(qw)
    tokens = torch.randint(0, 300, (2, 7))
    assert torch.equal(emb(tokens), fxquant.qweight.dequantize(qw)[tokens])


def test_grouped_conv_codes_are_packed_too():
    qw = quantize_weight(torch.randn(8, 1 * 3), 4, "uniform", "channel")
    conv = LowbitConv(qw, None, (8, 1, 3), [1], [1], [1], groups=8)
    assert conv.packed_codes.nbytes == 12 and conv(torch.randn(1, 8, 10)).shape == (1, 8, 10)


def test_report_shows_resident_beside_packed_bytes():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128)).eval()
    cm = fxquant.compile_lowbit(model, (torch.randn(2, 256),), bits=4, target=NATIVE)
    s = cm.summary()
    # packed weights + the kernels' padded copies of scales, once each: no unpacked codes, no fp32 weights
    assert s["model_bytes"] < s["resident_bytes"] < 1.6 * s["model_bytes"]
    assert "resident weight memory" in cm.report()


@pytest.mark.slow
def test_fresh_process_rss_growth_after_load_is_close_to_packed_bytes(tmp_path):
    """Issue 12: load + one call of a saved W4 model grows RSS by <= 1.5x packed bytes + 64 MiB (~15 s)."""
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(6)]).eval()
    cm = fxquant.compile_lowbit(model, (torch.randn(1, 2048),), bits=4, target=NATIVE)
    cm.save(tmp_path / "six")
    packed = cm.summary()["model_bytes"]
    tiny = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    fxquant.compile_lowbit(tiny, (torch.randn(1, 64),), bits=4, target=NATIVE).save(tmp_path / "tiny")
    script = textwrap.dedent(f"""
        import torch, fxquant
        def rss():
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
        x = torch.randn(1, 2048)
        fxquant.load({str(tmp_path / 'tiny')!r})(torch.randn(1, 64))   # libraries and pool, not weights
        before = rss()
        cm = fxquant.load({str(tmp_path / 'six')!r})
        cm(x)
        print(rss() - before)
    """)
    growth = int(
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
        ).stdout.split()[-1]
    )
    assert growth <= 1.5 * packed + (64 << 20), (growth / 2**20, packed / 2**20)
