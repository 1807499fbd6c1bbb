from __future__ import annotations

import torch
from torch import nn

import fxquant
from fxquant.ops import LowbitLinear

ADD = torch.ops.aten.add.Tensor
BASE = "cleanup,propagate-shapes,calibrate,assign-precision,quantize,lower"


class Residual(nn.Module):
    def __init__(self, d: int = 64):
        super().__init__()
        self.out, self.fc, self.shared, self.row = (
            nn.Linear(d, d),
            nn.Linear(d, d),
            nn.Linear(d, d),
            nn.Linear(d, d),
        )

    def forward(self, x, bias_row):
        y = x + self.out(x)  # fused
        y = self.fc(y).relu() + y  # fused (operand order and epilogue do not matter)
        s = self.shared(y)
        z = s + y  # not fused: s has a second user
        return z * s, self.row(y) + bias_row  # not fused: broadcasts a (D,) row


def _compile(model, args, fuse: bool, target="reference"):
    passes = (
        BASE
        + (",fuse-residual" if fuse else "")
        + ("" if target == "reference" else ",codegen{never_slower=false}")
    )
    return fxquant.compile_lowbit(model, args, bits=8, passes=passes, target=target)


def test_residual_adds_fold_into_the_producing_linear():
    model, args = Residual().eval(), (torch.randn(2, 5, 64), torch.randn(64))
    cm, ref = _compile(model, args, True), _compile(model, args, False)
    gm = cm.graph_module
    fused = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and getattr(gm.get_submodule(n.target), "residual", 0)
    ]
    assert sorted(n.meta["fxq_module"] for n in fused) == ["fc", "out"]
    assert all(len(n.args) == 2 for n in fused)
    assert len([n for n in gm.graph.nodes if n.target is ADD]) == 2
    assert any("2 residual adds fused" in t.message for t in cm.timings)
    for a, b in zip(cm(*args), ref(*args)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_kernels_match_the_unfused_graph(tmp_path):
    model, args = Residual().eval(), (torch.randn(1, 1, 64), torch.randn(64))
    cm, ref = _compile(model, args, True, "native"), _compile(model, args, False, "native")
    assert any(
        isinstance(m, LowbitLinear) and m.residual and m.kernel.name.endswith("_res")
        for m in cm.graph_module.modules()
    )
    for a, b in zip(cm(*args), ref(*args)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    loaded = fxquant.load(cm.save(tmp_path / "res"))
    for a, b in zip(loaded(*args), cm(*args)):
        assert torch.equal(a, b)
