"""Conv kernels (im2col + linear, grouped/depthwise direct) and attaching kernels to a GraphModule."""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import fx, nn

from fxquant.codegen import TARGETS, attach_kernels, compile_op
from fxquant.ops import LowbitConv, LowbitLinear

from .codegen_cases import assert_close, make_qweight

RUNNABLE = [t for t in ("avx512", "portable") if TARGETS[t].runnable()]


def make_conv(cin, cout, ks, stride, padding, dilation, groups, act_bits=8, epilogue=None, bits=4, bias=True):
    k = cin // groups * math.prod(ks)
    qw = make_qweight(cout, k, bits, 32 if k > 32 else None, "sym")
    b = torch.randn(cout) if bias else None
    return LowbitConv(
        qw, b, (cout, cin // groups, *ks), stride, padding, dilation, groups, act_bits, epilogue
    )


CONVS = [  # (cin, cout, kernel, stride, padding, dilation, groups, act_bits, epilogue, input shape)
    (8, 13, (3,), (2,), (1,), (1,), 1, 8, "gelu", (2, 8, 31)),  # whisper conv2 style
    (8, 13, (3,), (1,), (1,), (1,), 1, None, None, (1, 8, 20)),
    (6, 10, (3, 3), (1, 1), (1, 1), (1, 1), 1, 8, "relu", (2, 6, 9, 7)),
    (16, 16, (1, 1), (1, 1), (0, 0), (1, 1), 1, 8, None, (1, 16, 5, 6)),  # 1x1: no unfold
    (12, 12, (1, 3), (1, 1), (0, 2), (1, 2), 12, None, "silu", (2, 12, 5, 11)),  # bcresnet depthwise
    (8, 8, (3, 1), (2, 1), (1, 0), (1, 1), 8, None, None, (1, 8, 10, 4)),
    (8, 12, (3,), (1,), (2,), (2,), 2, None, "relu", (2, 8, 17)),  # grouped conv1d
]


@pytest.mark.parametrize("target", RUNNABLE)
@pytest.mark.parametrize("case", CONVS, ids=str)
def test_conv(target, case):
    *params, shape = case
    op = make_conv(*params)
    kern = compile_op(op, target)
    x = torch.randn(shape)
    assert_close(kern(x), op.reference(x), f"{kern.name} {case}")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = make_conv(4, 8, (3,), (1,), (1,), (1,), 1, 8, "gelu")
        self.dw = make_conv(8, 8, (3,), (1,), (1,), (1,), 8, None, None)
        self.fc = LowbitLinear(make_qweight(13, 8, 4, None, "asym"), torch.randn(13), epilogue="relu")

    def forward(self, x):
        return self.fc(self.dw(self.conv(x)).transpose(1, 2))


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, name):
        return isinstance(m, (LowbitLinear, LowbitConv)) or super().is_leaf_module(m, name)


def traced() -> fx.GraphModule:
    model = Tiny()
    return fx.GraphModule(model, LeafTracer().trace(model))


def test_attach_kernels_writes_sources(tmp_path):
    gm = traced()
    x = torch.randn(2, 4, 10)
    ref = gm(x)
    report = attach_kernels(gm, target="portable", out_dir=tmp_path)
    assert set(report.attached) == {"conv", "dw", "fc"}
    assert all(b == "c:portable" for b in report.backends.values())
    assert gm.fc.backend == "c:portable" and gm.fc.kernel is not None
    assert_close(gm(x), ref, "attached graph")
    assert sorted(p.name for p in tmp_path.glob("*.c")) == ["conv.c", "dw.c", "fc.c"]
    clone = copy.deepcopy(gm)  # pipelines copy graphs: kernels are shared, not copied
    assert clone.fc.kernel is gm.fc.kernel
    with pytest.raises(TypeError, match="re-attach"):
        pickle.dumps(gm.fc.kernel)
    attach_kernels(gm, target="reference")
    assert gm.fc.kernel is None and gm.fc.backend == "reference"


def test_attach_fallback_for_unsupported_format(tmp_path):
    gm = traced()
    gm.fc = LowbitLinear(make_qweight(13, 8, 6, None, "row_cb"), None)  # 6-bit codebooks: no avx512 kernel
    with pytest.raises(ValueError, match="portable"):
        attach_kernels(gm, target="avx512")
    report = attach_kernels(gm, target="avx512", fallback=True)
    assert report.backends["fc"] == "c:portable" and "fc" in report.fell_back
    assert report.backends["conv"] == "c:avx512"


def test_codegen_pass_records_provenance_and_forward(tmp_path):
    from fxquant.ir import PROVENANCE
    from fxquant.passes.compile_kernels import CodegenOptions, codegen_pass
    from fxquant.registry import PassContext, get_pass

    info = get_pass("codegen")
    assert info.fn is codegen_pass and info.options is CodegenOptions and info.kind == "transform"

    gm = traced()
    ctx = PassContext(options=CodegenOptions(target="portable"), work_dir=tmp_path)
    result = codegen_pass(gm, ctx)
    assert result.changed and "3 kernels attached" in result.message
    node = next(n for n in gm.graph.nodes if n.target == "fc")
    assert any(p.startswith("codegen: kernel linear_portable_w4gc") for p in node.meta[PROVENANCE])
    assert (tmp_path / "forward.py").read_text() == gm.code
    assert (tmp_path / "fc.c").exists()


@pytest.mark.parametrize("target", RUNNABLE)
def test_static_activation_scale(target):
    """Ops lowered with a calibrated per-tensor int8 scale (act_mode='static'), incl. clipped values."""
    lower = pytest.importorskip("fxquant.passes.lower")
    lin = lower.StaticLowbitLinear(make_qweight(21, 70, 4, 32, "asym"), torch.randn(21), 0.02, "relu")
    kern = compile_op(lin, target)
    assert kern.supports_static_act
    lin.kernel = kern
    for m in (1, 3, 61):
        x = torch.randn(m, 70) * 2  # |x| / 0.02 > 127 clips
        assert_close(lin(x), lin.reference(x), f"static linear M={m}")
    w = make_qweight(13, 8 * 3, 4, None, "sym")
    conv = lower.StaticLowbitConv(w, torch.randn(13), (13, 8, 3), [2], [1], [1], 1, 0.05, "gelu")
    conv.kernel = compile_op(conv, target)
    x = torch.randn(2, 8, 31)
    assert_close(conv(x), conv.reference(x), "static conv1d")



def test_attach_builds_kernels_concurrently(monkeypatch):
    """Kernels of different ops are built at the same time: every fake build waits at a barrier for
    another one (a serial loop would time out there); all are still attached, in graph order."""
    import threading

    import fxquant.codegen.attach as attach_mod

    gm = traced()
    barrier = threading.Barrier(2, timeout=20)
    threads = []

    class FakeKernel:
        source = "/* fake */"

        def __init__(self, name):
            self.name = name

    def fake_compile(op, target, cache_dir):
        threads.append(threading.get_ident())
        if len(threads) <= 2:
            barrier.wait()          # BrokenBarrierError (test failure) unless two builds overlap
        return FakeKernel(f"kernel{len(threads)}")

    monkeypatch.setattr(attach_mod, "compile_op", fake_compile)
    monkeypatch.setattr(attach_mod, "BUILD_WORKERS", 2)
    report = attach_mod.attach_kernels(gm, target="portable")
    assert len(threads) == 3 and len(set(threads[:2])) == 2
    assert list(report.attached) == [name for name, _ in attach_mod.lowered_ops(gm)]
    assert all(b == "c:portable" for b in report.backends.values())
