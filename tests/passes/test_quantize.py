"""quantize: packed weights in ctx.state, QUANT_STATS numbers, gptq fallback, bad weights."""
import pytest
import torch

from fxquant import ir
from fxquant.errors import ConfigError
from fxquant.passmanager import PassManager
from fxquant.registry import PassContext
from fxquant.tracing import capture
from fxquant.analysis import PackedWeights


pytestmark = pytest.mark.usefixtures("one_thread")


def run(model, x, config, passes="calibrate,assign-precision,quantize", gm_hook=None):
    gm = capture(model.eval(), (x,))
    if gm_hook:
        gm_hook(gm)
    ctx = PassContext(example_inputs=(x,), calibration=[(x,)], config=config)
    return PassManager(passes).run(gm, ctx), ctx


def stats(gm):
    return {ir.module_of(n): n.meta[ir.QUANT_STATS] for n in gm.graph.nodes if ir.QUANT_STATS in n.meta}


def test_w8_sqnr_and_bytes():
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    gm, ctx = run(model, torch.randn(64, 256), {"bits": 8})
    s = stats(gm)
    assert s["0"]["params"] == 256 * 64 and s["0"]["fp32_bytes"] == 4 * 256 * 64
    assert (
        s["0"]["bytes"]
        == ctx.analyses.cached(PackedWeights).weights["linear"].nbytes()
        == 256 * 64 + 64 * 4 + 256
    )  # codes + scales + table
    assert s["0"]["sqnr_db"] > 35 and s["2"]["sqnr_db"] > 35
    assert any(
        "quantize: W8 uniform/channel A8" in p
        for p in next(n for n in gm.graph.nodes if n.name == "linear").meta[ir.PROVENANCE]
    )


def test_lower_bits_lower_sqnr_and_float_nodes():
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.Linear(64, 8))
    gm, _ = run(model, torch.randn(64, 256), {"bits": 2, "rules": {"1": "float"}})
    s = stats(gm)
    assert 3 < s["0"]["sqnr_db"] < 15
    assert s["1"]["bytes"] == s["1"]["fp32_bytes"] and s["1"]["sqnr_db"] == float("inf")


def test_gptq_improves_output_sqnr_on_correlated_inputs():
    x = torch.randn(512, 128) @ (torch.randn(128, 128) * 0.3 + torch.eye(128))
    model = torch.nn.Linear(128, 64)
    near = stats(run(model, x, {"bits": 3})[0])[""]["sqnr_db"]
    gptq = stats(run(model, x, {"bits": 3, "gptq": True})[0])[""]["sqnr_db"]
    assert gptq > near + 1.0


def test_gptq_falls_back_to_nearest_for_grouped_conv():
    model = torch.nn.Conv1d(8, 8, 3, groups=8)
    gm, _ = run(model, torch.randn(2, 8, 20), {"bits": 4, "gptq": True, "rules": {"op:depthwise": 4}})
    node = next(n for n in gm.graph.nodes if ir.is_quantizable(n))
    assert any("gptq -> nearest" in p for p in node.meta[ir.PROVENANCE])


def test_gptq_needs_more_calibration_rows_than_input_channels():
    """Fewer rows than 2K: H is (near) singular, GPTQ would push error where calibration never looked."""
    model = torch.nn.Linear(128, 64)
    with pytest.warns(UserWarning, match="too few calibration rows"):
        gm, _ = run(model, torch.randn(100, 128), {"bits": 3, "gptq": True})
    node = next(n for n in gm.graph.nodes if ir.is_quantizable(n))
    assert any("100 calibration rows for K=128" in p for p in node.meta[ir.PROVENANCE])
    gm, _ = run(model, torch.randn(256, 128), {"bits": 3, "gptq": True})
    node = next(n for n in gm.graph.nodes if ir.is_quantizable(n))
    assert not any("gptq -> nearest" in p for p in node.meta[ir.PROVENANCE])


def test_nan_weight_names_the_node():
    def poison(gm):
        with torch.no_grad():
            ir.get_attr_value(gm, "0.weight")[0, 0] = float("nan")

    model = torch.nn.Sequential(torch.nn.Linear(16, 4))
    with pytest.raises(ConfigError, match=r"node 'linear' \(module '0'\).*NaN"):
        run(model, torch.randn(2, 16), {"bits": 4}, passes="assign-precision,quantize", gm_hook=poison)


@pytest.mark.slow   # a full real-size compile (CI runs the slow tier)
def test_bcresnet_w8a8_keeps_accuracy(shared):
    """End to end on the pretrained keyword spotter (skipped when ../shared is absent; ~15 s)."""
    import fxquant
    from fxquant.models.bcresnet import fsdd_features, keyword_accuracy, load_bcresnet

    model = load_bcresnet()
    train, _ = fsdd_features("train")
    calib = [(train[i : i + 16],) for i in range(0, 64, 16)]
    cm = fxquant.compile_lowbit(
        model, (train[:2],), bits=8, calibration=calib, target="reference", progress=False
    )
    fp32, total = keyword_accuracy(model, "test")
    w8, _ = keyword_accuracy(cm, "test")
    assert total == 300 and abs(fp32 - w8) <= 3  # within 1 point on the 300 test clips
    assert cm.summary()["model_bytes"] < 0.6 * cm.fp32_bytes


def test_quantize_reuses_a_result_already_in_the_shared_cache():
    """What the sensitivity sweep computed (same weight, format, hdiag) is not quantized again."""
    from fxquant.passes.quantize import quant_args, quant_cache

    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 32))
    x = torch.randn(32, 128)
    gm = capture(model.eval(), (x,))
    ctx = PassContext(example_inputs=(x,), calibration=[(x,)], config={"bits": 4})
    gm = PassManager("calibrate,assign-precision").run(gm, ctx)
    node = next(n for n in gm.graph.nodes if ir.is_quantizable(n))
    early = quant_cache(ctx).quantize(**quant_args(gm, node)[0])  # e.g. by the sensitivity pass
    gm = PassManager("quantize").run(gm, ctx)
    assert ctx.analyses.cached(PackedWeights).weights[node.name] is early and quant_cache(ctx).hits == 1


def test_map_layers_keeps_order_and_results_across_threads():
    from fxquant.formats import quantize_weight
    from fxquant.passes.quantize import map_layers

    base = torch.randn(64, 96)
    ws = [base * (i + 1) for i in range(5)]  # scales grow with i: order visible
    one = map_layers(lambda w: quantize_weight(w, 3, "uniform", "group", 32), ws, workers=1)
    two = map_layers(lambda w: quantize_weight(w, 3, "uniform", "group", 32), ws, workers=2)
    assert all(torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) for a, b in zip(one, two))
    top = [float(q.scales.max()) for q in two]
    assert top == sorted(top) and abs(top[4] / top[0] - 5) < 1e-5
    with pytest.raises(ZeroDivisionError):
        map_layers(lambda i: 1 // i, [1, 0, 2], workers=2)
