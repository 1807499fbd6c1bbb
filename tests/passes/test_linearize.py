from __future__ import annotations

import torch
from torch import nn

from fxquant import ir

from .helpers import run, targets

aten = torch.ops.aten


class TiedHead(nn.Module):
    """Embedding whose table also projects to logits (Whisper's decoder)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Parameter(torch.randn(16, 8))
        self.bias = nn.Parameter(torch.randn(8))
        self.w_out = nn.Parameter(torch.randn(8, 16))

    def forward(self, tokens):
        h = self.embed(tokens)
        logits = torch.matmul(h, self.embed.weight.t())
        extra = torch.addmm(self.bias, h.reshape(-1, 16), self.w_out.t())
        return logits, h @ self.proj, extra


def test_matmuls_with_constant_weights_become_linear():
    model, tokens = TiedHead().eval(), torch.randint(0, 50, (2, 5))
    gm = run(model, (tokens,), "cleanup,const-fold,linearize")
    assert aten.matmul.default not in targets(gm) and aten.addmm.default not in targets(gm)
    linears = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert len(linears) == 3 and all(ir.is_quantizable(n) for n in linears)
    tied = linears[0]
    assert tied.args[1].target == "embed.weight" and tied.meta[ir.MODULE] == "embed"   # no copy of the table
    assert any("rewritten as linear" in p for p in tied.meta[ir.PROVENANCE])
    for got, want in zip(gm(tokens), model(tokens)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_const_fold_does_not_copy_transposed_weights():
    gm = run(TiedHead(), (torch.randint(0, 50, (2, 5)),), "const-fold")
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_fxq_const_")]
