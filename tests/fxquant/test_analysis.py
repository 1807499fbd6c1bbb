"""Typed pass contracts (fxquant/analysis.py) on small hand-built fx graphs: missing prerequisites,
invalidation after a graph change, on-demand analyses, old-style passes without declarations."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import fxquant
from fxquant import ir
from fxquant.analysis import (AnalysisManager, CalibrationData, PackedWeights, PrecisionPlan,
                              SensitivityTable)
from fxquant.quant_cache import QuantCache, quant_cache
from fxquant.passmanager import PassManager
from fxquant.registry import PassContext, PassResult, get_pass, register_pass, unregister_pass

aten = torch.ops.aten


def linear_graph() -> fx.GraphModule:
    """x -> aten.linear(x, w[8, 64], b[8]) -> aten.relu, built node by node (no tracing)."""
    root = torch.nn.Module()
    torch.manual_seed(0)
    root.register_buffer("w", torch.randn(8, 64))
    root.register_buffer("b", torch.randn(8))
    g = fx.Graph()
    x = g.placeholder("x")
    w, b = g.get_attr("w"), g.get_attr("b")
    lin = g.call_function(aten.linear.default, (x, w, b))
    out = g.call_function(aten.relu.default, (lin,))
    g.output(out)
    for node in (lin, out):
        node.meta[ir.MODULE] = "fc"
    return fx.GraphModule(root, g)


X = torch.randn(4, 64)


def context(**config) -> PassContext:
    return PassContext(example_inputs=(X,), calibration=[(X,)], config={"bits": 4, **config})


@pytest.fixture
def scratch_passes():
    names = []

    def add(name, fn, **kw):
        register_pass(name, **kw)(fn)
        names.append(name)
        return name

    yield add
    for name in names:
        unregister_pass(name)


def test_builtin_contracts_are_declared():
    assert get_pass("calibrate").contract.provides == (CalibrationData,)
    assert get_pass("quantize").contract.requires == (PrecisionPlan,)
    assert get_pass("quantize").contract.provides == (PackedWeights,)
    assert get_pass("lower").contract.requires == (PackedWeights,)
    assert get_pass("lower").contract.preserved == ()            # a transform: nothing survives its changes
    assert get_pass("calibrate").contract.preserved == "all"     # an analysis pass changes no graph
    assert PackedWeights in get_pass("tie-embeddings").contract.preserved


def test_pipeline_without_quantize_is_rejected_before_any_pass_runs():
    gm = linear_graph()
    code = gm.code
    with pytest.raises(fxquant.ConfigError) as info:
        PassManager("calibrate,assign-precision,lower").run(gm, context())
    msg = str(info.value)
    assert "pass 'lower' (step 3) needs PackedWeights" in msg and "pass 'quantize' provides" in msg
    assert "'calibrate,assign-precision,quantize,lower'" in msg            # the fixed pipeline string
    assert gm.code == code and all(ir.DECISION not in n.meta for n in gm.graph.nodes)   # nothing ran


def test_missing_prerequisite_of_quantize_names_assign_precision():
    with pytest.raises(fxquant.ConfigError, match=r"needs PrecisionPlan .* 'assign-precision'.*'calibrate,"
                                                  r"assign-precision,quantize'"):
        PassManager("calibrate,quantize").run(linear_graph(), context())


def test_compile_lowbit_rejects_a_pipeline_string_without_prerequisites():
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    with pytest.raises(fxquant.ConfigError, match="add it before 'lower'|Add it before 'lower'"):
        fxquant.compile_lowbit(
            model, (X,), bits=4, passes="cleanup,assign-precision,lower", target="reference"
        )


def test_lower_called_directly_without_quantize_never_requantizes():
    gm = linear_graph()
    ctx = context()
    PassManager("assign-precision").run(gm, ctx)
    lower = get_pass("lower")
    ctx.options = lower.options()
    with pytest.raises(fxquant.ConfigError, match="'quantize' has not run; add 'quantize' before 'lower'"):
        lower.fn(gm, ctx)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [
        aten.linear.default,
        aten.relu.default,
    ]


def test_full_contract_chain_lowers_with_the_packed_weight():
    gm = linear_graph()
    ctx = context()
    gm = PassManager("calibrate,assign-precision,quantize").run(gm, ctx)
    plan, packed = ctx.analyses.cached(PrecisionPlan), ctx.analyses.cached(PackedWeights)
    assert plan.avg_bits == 4.0 and plan.params == 512 and set(plan.decisions) == {"linear_default"}
    assert set(packed.weights) == {"linear_default"} and packed.weights["linear_default"].bits == 4
    gm = PassManager("lower").run(gm, ctx)
    ops = [m for m in gm.modules() if isinstance(m, fxquant.runtime.LowbitLinear)]
    assert (
        len(ops) == 1
        and torch.equal(ops[0].qweight.codes, packed.weights["linear_default"].codes)
        and ops[0].epilogue == "relu"
    )
    assert ctx.analyses.cached(PackedWeights) is None  # lower changed the graph: node-keyed weights dropped
    assert ctx.analyses.cached(CalibrationData) is None
    assert isinstance(quant_cache(ctx), QuantCache) and quant_cache(ctx).misses == 1  # always valid


def test_a_transform_that_changes_the_graph_invalidates_what_it_does_not_preserve(scratch_passes):
    def insert_neg(gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        src = out.args[0]
        with gm.graph.inserting_before(out):
            neg = gm.graph.call_function(aten.neg.default, (src,))
        neg.meta[ir.MODULE] = ""
        out.replace_input_with(src, neg)
        return PassResult(changed=True, message="negated")

    name = scratch_passes("negate-test", insert_neg)
    ctx = context()
    with pytest.raises(fxquant.ConfigError) as info:
        PassManager(f"calibrate,assign-precision,quantize,{name},lower").run(linear_graph(), ctx)
    msg = str(info.value)
    assert "pass 'lower' needs PackedWeights" in msg
    assert f"transform pass '{name}' changed the graph after it and invalidated it" in msg
    assert f"run '{name}' before 'quantize'" in msg
    assert ctx.analyses.available() == {QuantCache}


def test_preserved_analyses_and_unchanged_graphs_survive_a_transform(scratch_passes):
    def touch(gm, ctx):
        return PassResult(changed=False)

    def rename_meta(gm, ctx):  # changes the graph but declares that packed weights stay valid
        for n in gm.graph.nodes:
            if n.target is aten.relu.default:
                n.meta[ir.MODULE] = "fc.act"
        return PassResult(changed=True)

    noop = scratch_passes("noop-test", touch)
    keep = scratch_passes("keep-test", rename_meta, preserves=(PackedWeights,))
    ctx = context()
    gm = PassManager(f"calibrate,assign-precision,quantize,{noop},{keep},lower").run(linear_graph(), ctx)
    assert sum(isinstance(m, fxquant.runtime.LowbitLinear) for m in gm.modules()) == 1


def test_second_pipeline_on_the_same_context_sees_earlier_analyses():
    gm, ctx = linear_graph(), context()
    gm = PassManager("calibrate,assign-precision").run(gm, ctx)
    assert ctx.analyses.available() >= {CalibrationData, PrecisionPlan}
    gm = PassManager("quantize,lower").run(gm, ctx)  # as fxquant.asr.joint does
    assert sum(isinstance(m, fxquant.runtime.LowbitLinear) for m in gm.modules()) == 1


def test_a_pass_that_declares_but_does_not_provide_is_an_error(scratch_passes):
    name = scratch_passes(
        "liar-test", lambda gm, ctx: PassResult(), kind="analysis", provides=(SensitivityTable,)
    )
    with pytest.raises(fxquant.PipelineError, match=r"declares provides=\['SensitivityTable'\] but did not"):
        PassManager(name).run(linear_graph(), context())


def test_old_style_pass_without_declarations_still_runs_and_may_use_state(scratch_passes):
    def count(gm, ctx):
        ctx.state["count"] = sum(n.op == "call_function" for n in gm.graph.nodes)
        return PassResult(message=f"{ctx.state['count']} calls")

    name = scratch_passes("old-style-test", count, kind="analysis")
    ctx = context()
    pm = PassManager(f"calibrate,{name},assign-precision,quantize,lower")
    pm.run(linear_graph(), ctx)
    assert ctx.state == {"count": 2} and pm.timings[1].message == "2 calls"


def test_register_pass_rejects_untyped_declarations():
    with pytest.raises(TypeError, match="requires must list Analysis subclasses"):
        register_pass("bad-test", requires=("qweights",))
    with pytest.raises(TypeError, match="preserves must list Analysis subclasses"):
        register_pass("bad-test", preserves=(dict,))


def test_analysis_manager_round_trip_and_invalidation_record():
    am = AnalysisManager()
    am.set(PackedWeights(weights={"linear": None}))
    am.set(CalibrationData(batches=2))
    assert am.invalidate("fold-bn", preserved=(CalibrationData,)) == ["PackedWeights"]
    assert am.cached(CalibrationData).batches == 2 and am.cached(PackedWeights) is None
    with pytest.raises(fxquant.ConfigError, match="transform pass 'fold-bn' changed the graph"):
        am.get(PackedWeights, needed_by="lower")
    am.set(PackedWeights())
    assert am.get(PackedWeights).weights == {}
    with pytest.raises(TypeError, match="Analysis instances"):
        am.set({"qweights": {}})
