"""Formats and targets are data: the tables, and a format / a target added as one entry each."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fxquant
from fxquant import formats, qweight, rules
from fxquant.codegen import TARGETS, Target, compile_op, targets
from fxquant.codegen.kernel_table import KERNELS, UnsupportedOp, kernel_for
from fxquant.ops import LowbitLinear
from fxquant.qweight import reference_linear
from fxquant.sensitivity import candidate_table

HAVE_CC = True
try:
    fxquant.codegen.find_compiler()
except fxquant.codegen.BuildError:
    HAVE_CC = False


def test_candidate_table_is_read_from_the_format_rows():
    assert candidate_table() == {
        "uniform": (
            (8, "uniform"),
            (6, "uniform"),
            (5, "uniform"),
            (4, "uniform"),
            (3, "uniform"),
            (2, "uniform"),
        ),
        "codebook": ((8, "uniform"), (6, "uniform"), (4, "codebook"), (3, "codebook"), (2, "codebook")),
        "auto": (
            (8, "uniform"),
            (6, "uniform"),
            (5, "uniform"),
            (4, "uniform"),
            (3, "uniform"),
            (2, "uniform"),
            (4, "codebook"),
            (3, "codebook"),
            (2, "codebook"),
        ),
    }
    assert formats.scheme_options() == ("uniform", "codebook", "auto")
    assert formats.quantized_formats() == ("uniform", "codebook")


def test_every_row_is_complete_and_its_byte_cost_exact():
    w = torch.randn(24, 96)
    for name in formats.quantized_formats():
        fmt = formats.FORMATS[name]
        assert fmt.fit and fmt.quantize_groups and fmt.tables and fmt.kernel in KERNELS
        for bits in fmt.candidates.get(name, ()):
            gran = fmt.granularity(bits, False) or "group"
            qw = formats.quantize_weight(w, bits, name, gran, 32 if gran == "group" else None)
            assert qw.nbytes() == formats.weight_bytes(
                (24, 96), bits, name, gran, 32 if gran == "group" else None
            )
            assert torch.equal(fmt.reference(qw), qweight.dequantize(qw))
    assert (
        formats.default_granularity("uniform", 4) is None
        and formats.default_granularity("uniform", 8) == "channel"
    )
    assert formats.default_granularity("codebook", 3, group_asked=True) == "group"


def test_kernel_table_lookup_and_errors():
    assert kernel_for("uniform", "portable").template == "linear_portable.c.j2"
    assert kernel_for("codebook", "f32").template == "linear_f32.c.j2"
    with pytest.raises(UnsupportedOp, match="'float' has no generated kernel"):
        kernel_for("float", "avx512")
    with pytest.raises(UnsupportedOp, match="has no 'sve' kernel"):
        kernel_for("uniform", "sve")


@pytest.fixture
def extra_format():
    """A format added as one row: it reuses the LUT kernels and the uniform packing, so the row is enough."""
    base = formats.FORMATS["uniform"]
    row = dataclasses.replace(
        base,
        name="uniform-sym",
        description="symmetric uniform, 4 or 3 bits only",
        bits_allowed=(3, 4),
        candidates={"uniform-sym": (4, 3)},
        check=lambda bits, symmetric: None if symmetric else "symmetric only",
    )
    formats.register_format(row)
    yield row
    del formats.FORMATS["uniform-sym"]
    qweight.SCHEMES.remove("uniform-sym")


def test_a_format_added_as_one_row_is_usable_everywhere(extra_format):
    assert formats.scheme_options() == ("uniform", "codebook", "uniform-sym", "auto")
    assert formats.candidates("uniform-sym") == ((4, "uniform-sym"), (3, "uniform-sym"))
    assert all(name != "uniform-sym" for _, name in formats.candidates("auto"))  # not an "auto" candidate
    w = torch.randn(16, 64)
    qw = formats.quantize_weight(w, 4, "uniform-sym", "group", 32)
    assert qw.scheme == "uniform-sym" and qw.nbytes() == formats.weight_bytes(
        (16, 64), 4, "uniform-sym", "group", 32
    )
    with pytest.raises(fxquant.ConfigError, match="symmetric only"):
        formats.quantize_weight(w, 4, "uniform-sym", symmetric=False)
    spec = rules.normalise_value("fc", {"bits": 3, "scheme": "uniform-sym"})
    decision = rules.make_decision(spec, {}, 128, "rule:fc", "rule 'fc'")
    assert decision.label() == "W3 uniform-sym/g64 A8"
    x = torch.randn(5, 64)
    op = LowbitLinear(qw, bias=None)
    assert torch.equal(op(x), reference_linear(x, qw))
    if HAVE_CC:
        kernel = compile_op(op, target="portable")
        torch.testing.assert_close(kernel(x), reference_linear(x, qw), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_a_format_row_can_drive_a_whole_compile(extra_format):
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(3, 64)
    cm = fxquant.compile_lowbit(model, (x,), avg_bits=4, scheme="uniform-sym", target="portable")
    ops = [op for op in cm.modules() if isinstance(op, LowbitLinear)]
    assert (
        len(ops) == 2 and {op.scheme for op in ops} == {"uniform-sym"} and {op.bits for op in ops} <= {3, 4}
    )
    with torch.no_grad():
        ref = model(x)
        assert float((cm(x) - ref).abs().max()) < 0.2 * float(ref.abs().max()) + 1e-3


def test_target_table_rows_tuning_and_names():
    assert targets.target_names() == ("native", "avx512", "avx2", "portable", "reference")
    assert (
        targets.tuning("avx512")["par_min_macs"] == 1 << 23
        and targets.tuning("avx2") == targets.DEFAULT_TUNING
    )
    assert TARGETS["avx2"].family == "portable" and "-mavx2" in TARGETS["avx2"].flags


@pytest.fixture
def extra_target():
    row = Target("portable_o2", (), ("-O2",), "portable", tuning={"par_min_macs": 1 << 20})
    TARGETS[row.name] = row
    yield row
    del TARGETS[row.name]


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_a_target_added_as_one_row_compiles_and_is_accepted(extra_target):
    assert (
        "portable_o2" in targets.target_names() and targets.tuning("portable_o2")["par_min_macs"] == 1 << 20
    )
    qw = qweight.QuantizedWeight.uniform_symmetric(torch.randn(12, 64), bits=4, group_size=32)
    x = torch.randn(3, 64)
    kernel = compile_op(LowbitLinear(qw, bias=None), target="portable_o2")
    assert kernel.target.name == "portable_o2" and "-O2" in kernel.target.flags
    torch.testing.assert_close(kernel(x), reference_linear(x, qw), rtol=1e-5, atol=1e-5)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8)).eval()
    cm = fxquant.compile_lowbit(model, (x,), bits=8, target="portable_o2")
    with torch.no_grad():
        assert float((cm(x) - model(x)).abs().max()) < 0.05
