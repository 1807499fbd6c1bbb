"""Anchored sensitivity: a few formats measured per group, the others estimated from weight error."""
import math

import pytest
import torch

import fxquant.tracing as capture_mod
from fxquant.errors import ConfigError
from fxquant.passes.calibrate import calibrate
from fxquant.passes.sensitivity import SensitivityOptions, sensitivity
from fxquant.registry import PassContext
from fxquant.sensitivity_estimate import choose_anchors, estimate_errors, pareto_frontier, weight_proxy


def test_weight_proxy_weights_columns_by_input_energy():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    wq = torch.tensor([[0.0, 2.0], [3.0, 3.0]])
    assert weight_proxy(w, wq, None) == pytest.approx(2.0)
    assert weight_proxy(w, wq, torch.tensor([10.0, 1.0])) == pytest.approx(11.0)


def test_pareto_frontier_drops_dominated_and_duplicate_candidates():
    assert pareto_frontier([4, 4, 2, 8, 4], [1.0, 3.0, 9.0, 0.5, 1.0]) == [0, 2, 3]


def test_anchors_are_nearest_to_the_target_width_then_its_neighbours():
    bits = [8, 6, 5, 4, 3, 2, 4, 3, 2]
    costs = [8, 6, 5, 4.1, 3.1, 2.1, 4.0, 3.0, 2.0]
    proxies = [1, 4, 15, 60, 250, 1200, 50, 200, 900]       # codebooks beat uniform at equal width
    assert choose_anchors(costs, proxies, bits, target_bits=4) == [2, 6, 7]
    assert choose_anchors(costs, proxies, bits, target_bits=3) == [6, 7, 8]


def test_estimates_interpolate_between_anchors_and_extrapolate_with_the_fitted_slope():
    proxies = [1.0, 10.0, 100.0, 1000.0, 10000.0]
    est = estimate_errors(proxies, {1: 0.01, 3: 1.0})           # slope 1 in log-log
    assert est[1] == 0.01 and est[3] == 1.0
    assert est[2] == pytest.approx(0.1)
    assert est[0] == pytest.approx(0.001)
    assert est[4] == pytest.approx(10.0)
    steep = estimate_errors(proxies, {1: 0.01, 2: 10.0})        # slope 3 is clamped to 2
    assert steep[3] == pytest.approx(10.0 * 10 ** 2)
    with pytest.raises(ValueError):
        estimate_errors(proxies, {})


def _mlp_context(measure: str, avg_bits: float = 4):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                            torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    calib = [(torch.randn(16, 32),) for _ in range(2)]
    gm = capture_mod.capture(m, calib[0])
    ctx = PassContext(example_inputs=calib[0], calibration=calib, config={"avg_bits": avg_bits})
    calibrate(gm, ctx)
    ctx.options = SensitivityOptions(measure=measure)
    return gm, ctx


def _errors(gm):
    return {n.name: n.meta["fxq_sensitivity"] for n in gm.graph.nodes if "fxq_sensitivity" in n.meta}


def test_anchored_sweep_keeps_measured_values_and_ranks_like_the_full_sweep():
    gm_all, ctx_all = _mlp_context("all")
    sensitivity(gm_all, ctx_all)
    full = _errors(gm_all)
    gm_a, ctx_a = _mlp_context("anchors")
    result = sensitivity(gm_a, ctx_a)
    est = _errors(gm_a)
    assert "9 of 27 candidates measured" in result.message and "the rest estimated" in result.message
    for node, exact in full.items():
        approx = est[node]
        assert set(approx) == set(exact)
        same = [k for k in exact if approx[k] == exact[k]]
        assert len(same) == 3                                 # the anchors are the measured values
        for k in exact:                                       # estimates within 4x (log error < 1.39)
            assert abs(math.log(approx[k] / exact[k])) < math.log(4), (node, k, approx[k], exact[k])
        order_exact = sorted(exact, key=exact.get)
        order_est = sorted(approx, key=approx.get)
        assert order_exact[0] == order_est[0] and order_exact[-1] == order_est[-1]


def test_unknown_measure_option_is_a_config_error():
    gm, ctx = _mlp_context("sometimes")
    with pytest.raises(ConfigError, match="measure must be one of"):
        sensitivity(gm, ctx)


@pytest.mark.parametrize("avg_bits, measured", [(4, "9 of 27"), (3, "27 of 27")])
def test_auto_anchors_only_budgets_of_four_bits_or_more(avg_bits, measured):
    gm, ctx = _mlp_context("auto", avg_bits)
    assert f"{measured} candidates measured" in sensitivity(gm, ctx).message
