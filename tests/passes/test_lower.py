"""lower: LowbitLinear / LowbitConv call_modules, epilogue fusion, weights removed, static, io q/dq."""
import pytest
import torch

from fxquant import ir
from fxquant.ops import LowbitConv, LowbitLinear
from fxquant.passmanager import PassManager
from fxquant.qweight import reference_linear
from fxquant.registry import PassContext
from fxquant.tracing import capture
from fxquant.passes.lower import StaticLowbitLinear, dequantize_int8, quantize_int8, static_linear
from fxquant.analysis import PackedWeights

PIPE = "calibrate,assign-precision,quantize,lower"


pytestmark = pytest.mark.usefixtures("one_thread")


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.ModuleDict(
            {"mlp": torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))}
        )
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x, img):
        y = self.encoder["mlp"](x)
        return y, torch.relu(self.conv(img))


INPUTS = (torch.randn(4, 64), torch.randn(2, 4, 6, 6))


def lowered(config, passes=PIPE, model=None):
    model = (model or Block()).eval()
    gm = capture(model, INPUTS)
    ctx = PassContext(example_inputs=INPUTS, calibration=[INPUTS], config=config)
    return model, PassManager(passes).run(gm, ctx), ctx


def test_graph_rewritten_with_epilogues_and_no_fp32_weights():
    model, gm, ctx = lowered({"bits": 8})
    mods = {
        n.target: gm.get_submodule(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module" and n.target != "_guards_fn"
    }
    assert set(mods) == {"encoder_mlp_0", "encoder_mlp_2", "conv_1"} or set(mods) == {
        "encoder_mlp_0",
        "encoder_mlp_2",
        "conv",
    }
    assert mods["encoder_mlp_0"].epilogue == "gelu" and isinstance(mods["encoder_mlp_0"], LowbitLinear)
    conv = next(m for k, m in mods.items() if k.startswith("conv"))
    assert isinstance(conv, LowbitConv) and conv.epilogue == "relu"
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.gelu.default not in targets and torch.ops.aten.relu.default not in targets
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)
    assert not any(k.endswith("weight") for k in gm.state_dict())
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target != "_guards_fn":
            assert n.meta[ir.MODULE] and any(p.startswith("lower:") for p in n.meta[ir.PROVENANCE])
    with torch.no_grad():
        ref, out = model(*INPUTS), gm(*INPUTS)
    for r, o in zip(ref, out):
        assert 10 * torch.log10(r.pow(2).sum() / (r - o).pow(2).sum()) > 30


def test_lowered_linear_is_exactly_the_reference():
    config = {"bits": 4, "rules": {"encoder.mlp.2": {"bits": 3, "scheme": "codebook"}}}
    _, gm, ctx = lowered(config, passes="calibrate,assign-precision,quantize")
    packed = ctx.analyses.cached(PackedWeights).weights["linear_1"]
    gm = PassManager("lower").run(gm, ctx)
    op = gm.get_submodule("encoder_mlp_2")
    h = torch.randn(4, 128)
    assert torch.equal(op.qweight.codes, packed.codes) and torch.equal(
        op(h), reference_linear(h, packed, op.bias)
    )
    assert op.scheme == "codebook" and op.bits == 3


def test_float_nodes_stay_aten():
    _, gm, _ = lowered({"bits": 4, "rules": {"conv": "float"}})
    assert torch.ops.aten.conv2d.default in [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_static_activations():
    _, gm, _ = lowered({"bits": 8, "rules": {"op:linear": {"bits": 8, "act_mode": "static"}}})
    op = gm.get_submodule("encoder_mlp_0")
    assert isinstance(op, StaticLowbitLinear) and op.act_mode == "static"
    assert op.act_scale.item() == pytest.approx(INPUTS[0].abs().max().item() / 127, rel=1e-6)
    x = INPUTS[0]
    expected = torch.nn.functional.gelu(static_linear(x, op.qweight, op.bias, op.act_scale))
    assert torch.equal(op(x), expected)
    xq = torch.clamp(torch.round(x / op.act_scale), -127, 127) * op.act_scale  # one scale for all rows
    assert torch.allclose(
        expected, torch.nn.functional.gelu(reference_linear(xq, op.qweight, op.bias, None)), atol=1e-4
    )


def test_io_qdq_nodes():
    _, gm, _ = lowered({"bits": 8}, passes=PIPE.replace("lower", "lower{io_qdq=true}"))
    fns = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert fns.count(quantize_int8) == 4 and fns.count(dequantize_int8) == 4  # 2 inputs + 2 outputs
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert all(a.target is dequantize_int8 for a in out.all_input_nodes)


def test_lowering_drops_the_second_moments_but_keeps_hdiag():
    _, gm, _ = lowered({"bits": 4, "gptq": True})
    stats = [n.meta[ir.ACT_STATS] for n in gm.graph.nodes if n.op == "call_module" and ir.ACT_STATS in n.meta]
    assert len(stats) == 3  # two linears and the conv, all lowered
    assert all("H" not in s and s["hdiag"].numel() in (64, 128, 36) for s in stats)
