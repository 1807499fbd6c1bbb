from __future__ import annotations

import torch
from torch import nn

import fxquant
from fxquant.ops import LowbitLinear

LN = torch.ops.aten.layer_norm.default
BASE = "cleanup,propagate-shapes,calibrate,assign-precision,quantize,lower"


class PreNorm(nn.Module):
    def __init__(self, d: int = 64):
        super().__init__()
        self.ln_a, self.ln_b = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.fc = nn.Linear(d, d), nn.Linear(d, 32), nn.Linear(d, 16)
        with torch.no_grad():
            for ln in (self.ln_a, self.ln_b):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.normal_()

    def forward(self, x):
        h = self.ln_a(x)                      # two linear users: fused into both
        g = self.ln_b(x)                      # also read by a float op: kept
        return self.q(h) + 1, self.k(h), self.fc(g) * g.sum(-1, keepdim=True)


def _compile(model, x, fuse: bool, target="reference"):
    passes = (
        BASE
        + (",fuse-layernorm" if fuse else "")
        + ("" if target == "reference" else ",codegen{never_slower=false}")
    )
    return fxquant.compile_lowbit(model, (x,), bits=4, passes=passes, target=target)


def test_norm_read_only_by_linears_moves_into_their_prologue():
    model, x = PreNorm().eval(), torch.randn(2, 7, 64) * 3 + 1
    cm, ref = _compile(model, x, True), _compile(model, x, False)
    gm = cm.graph_module
    norms = [n for n in gm.graph.nodes if n.target is LN]
    assert len(norms) == 1 and any(
        "fxq_provenance" in n.meta and "kept: user" in " ".join(n.meta["fxq_provenance"]) for n in norms
    )
    fused = {
        n.target: gm.get_submodule(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module" and getattr(gm.get_submodule(n.target), "ln_eps", None) is not None
    }
    assert sorted(m.codes.shape[0] for m in fused.values()) == [32, 64]
    assert all(m.ln_eps == 1e-5 and torch.equal(m.ln_weight, model.ln_a.weight) for m in fused.values())
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert all(
        n.args[0] is placeholder for n in gm.graph.nodes if n.op == "call_module" and n.target in fused
    )
    assert any("1 LayerNorms fused into linear kernels, 1 kept" in t.message for t in cm.timings)
    for a, b in zip(cm(x), ref(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_kernels_match_the_unfused_graph(tmp_path):
    model, x = PreNorm().eval(), torch.randn(1, 3, 64) * 3 + 1
    cm, ref = _compile(model, x, True, "native"), _compile(model, x, False, "native")
    assert any(
        isinstance(m, LowbitLinear) and m.ln_eps is not None and "_ln" in m.kernel.name
        for m in cm.graph_module.modules()
    )
    for a, b in zip(cm(x), ref(x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    loaded = fxquant.load(cm.save(tmp_path / "ln"))  # fusion survives the artifact
    for a, b in zip(loaded(x), cm(x)):
        assert torch.equal(a, b)
