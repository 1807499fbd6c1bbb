"""sensitivity pass + the solver and tie groups of fxquant.sensitivity."""
import pytest
import torch

from fxquant import ir
from fxquant.errors import ConfigError
from fxquant.passmanager import PassManager
from fxquant.registry import PassContext
from fxquant.sensitivity import plan, solve, tie_groups
from fxquant.tracing import capture
from fxquant.analysis import PrecisionPlan, SensitivityTable


pytestmark = pytest.mark.usefixtures("one_thread")


class TwoBranch(torch.nn.Module):
    """y = a(x) + 0.01 * b(x): b matters 100x less for the output (different parents: not tied)."""

    def __init__(self):
        super().__init__()
        self.pa, self.pb = (
            torch.nn.Sequential(torch.nn.Linear(64, 64)),
            torch.nn.Sequential(torch.nn.Linear(64, 64)),
        )

    def forward(self, x):
        return self.pa(x) + 0.01 * self.pb(x)


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(32, 32) for _ in range(3))
        self.o = torch.nn.Linear(32, 32)

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1)
        return self.o(att @ self.v(x))


def compiled(model, x, config, passes="calibrate,sensitivity,assign-precision"):
    gm = capture(model.eval(), (x,))
    ctx = PassContext(example_inputs=(x,), calibration=[(x,)], config=config)
    return PassManager(passes).run(gm, ctx), ctx


def decisions(gm):
    return {ir.module_of(n): n.meta[ir.DECISION] for n in gm.graph.nodes if ir.DECISION in n.meta}


def test_solver_picks_less_sensitive_layer_and_meets_budget_exactly():
    gm, ctx = compiled(TwoBranch(), torch.randn(64, 64), {"avg_bits": 6.0, "scheme": "uniform"})
    d = decisions(gm)
    assert d["pa.0"].weight_bits == 8 and d["pb.0"].weight_bits == 4
    assert ctx.analyses.cached(PrecisionPlan).avg_bits == 6.0
    assert d["pb.0"].decided_by == "budget:avg_bits=6"
    sens = next(n for n in gm.graph.nodes if ir.module_of(n) == "pb.0" and ir.SENSITIVITY in n.meta).meta[
        ir.SENSITIVITY
    ]
    assert sens["W2 uniform/channel A8"] > sens["W4 uniform/channel A8"] > sens["W8 uniform/channel A8"] > 0


def test_sensitivity_skipped_without_budget_and_kl_for_log_probs():
    gm, _ = compiled(TwoBranch(), torch.randn(8, 64), {"bits": 4}, passes="calibrate,sensitivity")
    assert not any(ir.SENSITIVITY in n.meta for n in gm.graph.nodes)
    model = torch.nn.Sequential(torch.nn.Linear(16, 10), torch.nn.LogSoftmax(-1))
    _, ctx = compiled(model, torch.randn(8, 16), {"avg_bits": 4}, passes="calibrate,sensitivity")
    assert ctx.analyses.cached(SensitivityTable).metric == "kl"


def test_solve_budget_bytes_and_too_small_budget():
    options = [[(100, 0.0), (50, 1.0), (30, 5.0)], [(100, 0.0), (50, 0.2), (30, 0.3)]]
    assert solve(options, 150) == [0, 1]
    assert solve(options, 80) == [1, 2]
    assert solve(options, 1000) == [0, 0]
    with pytest.raises(ConfigError, match="cheapest formats need 60"):
        solve(options, 59)


def test_budget_below_minimum_names_the_minimum():
    with pytest.raises(ConfigError, match=r"avg_bits >= 2\.000"):
        compiled(TwoBranch(), torch.randn(8, 64), {"avg_bits": 1.5})
    with pytest.raises(ConfigError, match=r"budget_bytes >= \d+"):
        compiled(TwoBranch(), torch.randn(8, 64), {"budget_bytes": 100})


def test_tie_groups_qkv_and_shared_weights():
    gm = capture(Attention().eval(), (torch.randn(2, 5, 32),))
    nodes = [n for n in gm.graph.nodes if ir.is_quantizable(n)]
    groups = [[ir.module_of(n) for n in g] for g in tie_groups(gm, nodes)]
    assert groups == [["q", "k", "v"], ["o"]]
    gm, _ = compiled(Attention(), torch.randn(2, 5, 32), {"avg_bits": 5.0})
    d = decisions(gm)
    assert d["q"] == d["k"] == d["v"]
    shared = torch.nn.Linear(16, 16)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    groups = plan(capture(model.eval(), (torch.randn(2, 16),)), {"avg_bits": 4})
    assert len(groups) == 1 and len(groups[0].names) == 2


def test_rules_pin_nodes_under_a_budget():
    gm, ctx = compiled(TwoBranch(), torch.randn(32, 64), {"avg_bits": 5.0, "rules": {"pa.0": 8}})
    d = decisions(gm)
    assert d["pa.0"].weight_bits == 8 and d["pa.0"].decided_by == "rule:pa.0"
    assert d["pb.0"].weight_bits == 2 and ctx.analyses.cached(PrecisionPlan).avg_bits == 5.0
    gm, _ = compiled(
        TwoBranch(), torch.randn(32, 64), {"avg_bits": 4.0, "rules": {"pb.*": {"scheme": "codebook"}}}
    )
    assert decisions(gm)["pb.0"].scheme == "codebook"  # a dict without bits restricts candidates


def test_a_min_bits_rule_raises_the_floor_of_its_nodes_only():
    gm = capture(TwoBranch().eval(), (torch.randn(32, 64),))
    by_name = {n.name: n for n in gm.graph.nodes}
    groups = {ir.module_of(by_name[g.names[0]]): g
              for g in plan(gm, {"avg_bits": 4.0, "rules": {"pb.*": {"min_bits": 4}}})}
    widths = {name: sorted({c.weight_bits for c in g.candidates}) for name, g in groups.items()}
    assert min(widths["pb.0"]) == 4 and min(widths["pa.0"]) == 2
    gm, _ = compiled(TwoBranch(), torch.randn(32, 64), {"avg_bits": 3.0, "rules": {"pb.*": {"min_bits": 4}}})
    d = decisions(gm)
    assert d["pb.0"].weight_bits >= 4 and d["pa.0"].weight_bits <= 2    # the other branch meets the budget


def test_measurement_never_writes_the_models_weights():
    import fxquant

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    before = [p.detach().clone() for p in model.parameters()]
    versions = [p._version for p in model.parameters()]  # bumped by any in-place write, even if undone later
    fxquant.compile_lowbit(model, (torch.randn(8, 16),), avg_bits=3.0, target="reference")
    assert [p._version for p in model.parameters()] == versions
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_large_weights_get_their_proxy_from_a_row_sample(monkeypatch):
    """Above PROXY_SAMPLE_PARAMS the proxy quantizes every s-th row only (never the whole weight) and
    scales by s: close to the full proxy for row-wise formats."""
    import fxquant.passes.sensitivity as sens

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256))
    x = torch.randn(32, 64)
    gm, _ = compiled(model, x, {"avg_bits": 4}, passes="calibrate")
    node = next(n for n in gm.graph.nodes if ir.is_quantizable(n))
    cand = ir.QuantDecision(weight_bits=3, scheme="codebook", granularity="channel")
    full = sens.candidate_proxy(gm, node, cand)
    monkeypatch.setattr(sens, "PROXY_SAMPLE_PARAMS", 1024)            # 16384 params: every 16th row
    monkeypatch.setattr(sens, "fake_quant", lambda *a, **k: pytest.fail("quantized the whole weight"))
    sampled = sens.candidate_proxy(gm, node, cand)
    assert sampled != full and abs(sampled / full - 1) < 0.3


def test_kl_against_precomputed_reference_logprobs_is_the_same_number():
    from fxquant.passes.sensitivity import output_error, reference_logprobs

    torch.manual_seed(0)
    ref, out = [torch.randn(3, 5, 11)], [torch.randn(3, 5, 11)]
    direct = output_error(ref, out, "kl")
    assert direct > 0 and output_error(reference_logprobs(ref), out, "kl") == direct
    assert output_error(reference_logprobs(ref), ref, "kl") == pytest.approx(0.0, abs=1e-6)


def test_own_sensitivity_inputs_follow_max_batches_zero_means_all():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    own = [(torch.randn(3, 8),) for _ in range(3)]
    for max_batches, expected in ((0, 3), (2, 2)):
        gm = capture(model, own[0])
        ctx = PassContext(example_inputs=own[0], config={"avg_bits": 4, "sensitivity_inputs": own})
        pm = PassManager(f"sensitivity{{max_batches={max_batches}}}")
        pm.run(gm, ctx)
        message = next(t.message for t in pm.timings if t.name == "sensitivity")
        assert f"on {expected} batches" in message, message
