from __future__ import annotations

import torch
from torch import nn

from fxquant import ir

from .helpers import run, targets

aten = torch.ops.aten


class PosEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("pos", torch.randn(6, 4))
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("table", torch.randn(1, 4))

    def forward(self, x):
        p = self.pos.t().t() * self.scale + 1.0   # constant subexpression
        big = self.table.repeat(6, 1)              # folding would grow memory 6x
        view = self.table.expand(6, 4)             # a free view: never copied
        return x + p + big + view


def test_folds_only_the_constant_frontier():
    model, x = PosEmbed(), torch.randn(2, 6, 4)
    gm = run(model, (x,), "const-fold")
    consts = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_fxq_const_")]
    assert len(consts) == 1                      # t, t, mul, add folded into one tensor
    assert aten.t.default not in targets(gm) and aten.mul.Tensor not in targets(gm)
    repeat = next(n for n in gm.graph.nodes if n.target is aten.repeat.default)   # left alone: growth
    assert any("not folded: result has 24 elements, inputs 4" in p for p in repeat.meta[ir.PROVENANCE])
    expand = next(n for n in gm.graph.nodes if n.target is aten.expand.default)   # left alone: view
    assert any("free view of parameters" in p for p in expand.meta[ir.PROVENANCE])
    torch.testing.assert_close(gm(x), model(x))


def test_growth_option_allows_folding():
    model, x = PosEmbed(), torch.randn(2, 6, 4)
    gm = run(model, (x,), "const-fold{max_growth=100}")
    assert aten.repeat.default not in targets(gm) and aten.expand.default in targets(gm)
    torch.testing.assert_close(gm(x), model(x))
