"""calibrate: activation ranges, percentiles, H = E[x x^T] for linear and conv, errors, progress bar."""
import pytest
import torch
import torch.nn.functional as F

from fxquant import ir
from fxquant.errors import ConfigError
from fxquant.passmanager import PassManager
from fxquant.registry import PassContext
from fxquant.tracing import capture
from fxquant.analysis import CalibrationData


pytestmark = pytest.mark.usefixtures("one_thread")


def calibrated(model, batches, **ctx_kw):
    gm = capture(model.eval(), batches[0])
    ctx = PassContext(example_inputs=batches[0], calibration=batches, **ctx_kw)
    return PassManager("calibrate").run(gm, ctx), ctx


def stats_of(gm, target):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == target).meta[
        ir.ACT_STATS
    ]


def test_linear_second_moments_accumulate_over_batches():
    batches = [(torch.randn(4, 5, 16),), (torch.randn(3, 5, 16) * 2,)]
    gm, ctx = calibrated(torch.nn.Linear(16, 8), batches)
    s = stats_of(gm, torch.ops.aten.linear.default)
    rows = torch.cat([b[0].reshape(-1, 16) for b in batches]).double()
    assert s["rows"] == 35 and s["batches"] == 2
    assert torch.allclose(s["H"], rows.T @ rows / 35, atol=1e-9)
    assert torch.allclose(s["hdiag"], rows.pow(2).mean(0), atol=1e-9)
    assert s["absmax"] == pytest.approx(rows.abs().max().item())
    assert torch.allclose(s["channel_absmax"].double(), rows.abs().amax(0))
    assert s["min"] == pytest.approx(rows.min().item()) and s["max"] == pytest.approx(rows.max().item())
    assert ctx.analyses.cached(CalibrationData).samples["linear"].shape[-1] == 16


def test_diag_only_when_nothing_reads_h():
    batches = [(torch.randn(4, 5, 16),), (torch.randn(3, 5, 16) * 2,)]
    model = torch.nn.Linear(16, 8)
    full, _ = calibrated(model, batches)
    gm = capture(model.eval(), batches[0])
    ctx = PassContext(example_inputs=batches[0], calibration=batches)
    diag = PassManager("calibrate{full_h=False}").run(gm, ctx)
    f, d = stats_of(full, torch.ops.aten.linear.default), stats_of(diag, torch.ops.aten.linear.default)
    assert d["H"] is None and f["H"] is not None
    assert torch.equal(d["hdiag"], f["hdiag"]) and d["rows"] == f["rows"] == 35


def test_conv_rows_are_im2col_patches():
    x = torch.randn(2, 3, 8, 8)
    gm, _ = calibrated(torch.nn.Conv2d(3, 4, 3, padding=1, stride=2), [(x,)])
    s = stats_of(gm, torch.ops.aten.conv2d.default)
    rows = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27).double()
    assert s["H"].shape == (27, 27) and s["rows"] == rows.shape[0]
    assert torch.allclose(s["H"], rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)  # float32 GEMMs
    assert s["channel_absmax"].shape == (3,)


def test_grouped_conv_keeps_only_diag():
    gm, _ = calibrated(torch.nn.Conv1d(4, 4, 3, groups=4), [(torch.randn(2, 4, 10),)])
    s = stats_of(gm, torch.ops.aten.conv1d.default)
    assert s["H"] is None and s["hdiag"].shape == (3,)


def test_percentile_from_bounded_histogram():
    torch.manual_seed(0)
    batches = [(torch.randn(64, 256) * (1 + i),) for i in range(3)]  # range grows: bins merge
    gm, _ = calibrated(torch.nn.Linear(256, 4), batches)
    s = stats_of(gm, torch.ops.aten.linear.default)
    allv = torch.cat([b[0].reshape(-1) for b in batches]).abs()
    exact = allv.quantile(0.9999 if allv.numel() < 2**24 else 0.999).item()
    assert s["pct"] == 99.99
    assert s["percentile"] == pytest.approx(exact, rel=0.05)
    assert s["percentile"] <= s["absmax"]


def test_io_stats_and_progress_bar(capsys):
    gm, ctx = calibrated(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()),
        [(torch.randn(2, 8),), (torch.randn(2, 8),)],
        progress=True,
    )
    placeholder = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    assert set(ctx.analyses.cached(CalibrationData).io_stats) == {placeholder, "output:0"}
    assert ctx.analyses.cached(CalibrationData).io_stats["output:0"]["min"] >= 0.0  # after the ReLU
    err = capsys.readouterr().err
    assert "calibrate [" in err and "2/2" in err


def test_empty_calibration_is_a_config_error():
    gm = capture(torch.nn.Linear(4, 4), (torch.randn(1, 4),))
    with pytest.raises(ConfigError, match="calibration set is empty"):
        PassManager("calibrate").run(gm, PassContext(example_inputs=(torch.randn(1, 4),), calibration=[]))


def test_example_inputs_used_when_no_calibration():
    gm = capture(torch.nn.Linear(4, 4), (torch.randn(3, 4),))
    gm = PassManager("calibrate").run(gm, PassContext(example_inputs=(torch.randn(3, 4),)))
    assert stats_of(gm, torch.ops.aten.linear.default)["rows"] == 3
