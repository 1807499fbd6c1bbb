"""awq-scale: exact in float, lowers the calibrated 4-bit error, leaves shared and user tensors alone."""
from __future__ import annotations

import torch
from torch import nn

import fxquant
from fxquant import ir
from fxquant.passmanager import PassManager
from fxquant.registry import PassContext


class Block(nn.Module):
    """LayerNorm -> q and k (siblings); 16 of 256 normalised channels are 6x larger (activation outliers)
    and the weights are heavy-tailed (Student-t), the regime where activation-aware scaling pays."""

    def __init__(self, d: int = 256):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            self.ln.weight[torch.randperm(d, generator=g)[:16]] = 6.0
            for lin in (self.q, self.k):
                lin.weight.copy_(torch.distributions.StudentT(3.0).sample((d, d)) * 0.05)

    def forward(self, x):
        h = self.ln(x)
        return self.q(h) * self.k(h)


def _run(model, x, pipeline="cleanup,propagate-shapes,calibrate,awq-scale"):
    gm = fxquant.capture(model, (x,))
    ctx = PassContext(example_inputs=(x,), calibration=[(x,)])
    return PassManager(pipeline).run(gm, ctx)


def test_exact_in_float_and_user_model_untouched():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(32, 10, 256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = _run(model, x)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    msgs = [m for n in gm.graph.nodes for m in n.meta.get(ir.PROVENANCE, ()) if m.startswith("awq-scale:")]
    assert msgs and "scaled by" in msgs[0]


def test_scaling_lowers_the_4bit_output_error():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(64, 10, 256)
    ref = model(x)
    errs = {}
    for name, pipeline in (
        ("plain", "cleanup,propagate-shapes,calibrate,assign-precision,quantize,lower"),
        ("awq", "cleanup,propagate-shapes,calibrate,awq-scale,assign-precision,quantize,lower"),
    ):
        gm = fxquant.capture(model, (x,))
        ctx = PassContext(example_inputs=(x,), calibration=[(x,)], config={"bits": 4, "act_bits": None})
        gm = PassManager(pipeline).run(gm, ctx)
        errs[name] = float((gm(x) - ref).pow(2).mean() / ref.pow(2).mean())
    assert errs["awq"] < 0.9 * errs["plain"], errs


def test_tied_weights_are_not_scaled():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.ln = nn.LayerNorm(16)

        def forward(self, tokens):
            return torch.nn.functional.linear(self.ln(self.emb(tokens)), self.emb.weight)

    model, tokens = Tied().eval(), torch.randint(0, 50, (4, 7))
    gm = _run(model, tokens, "cleanup,const-fold,linearize,propagate-shapes,calibrate,awq-scale")
    assert not any(m.startswith("awq-scale") for n in gm.graph.nodes for m in n.meta.get(ir.PROVENANCE, ()))
    torch.testing.assert_close(gm(tokens), model(tokens))
