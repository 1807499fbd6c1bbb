from __future__ import annotations

import torch

from fxquant import ir
from fxquant.zoo import KeywordCNN

from .helpers import run


def test_records_concrete_shapes_and_dtypes():
    gm = run(KeywordCNN(), (torch.randn(3, 1, 10, 10),), "propagate-shapes")
    shapes = {n.name: n.meta[ir.SHAPE] for n in gm.graph.nodes if n.op != "output"}
    assert shapes["x"] == (3, 1, 10, 10)
    assert shapes["conv2d"] == (3, 16, 10, 10)
    assert shapes["flatten"] == (3, 1600)
    assert shapes["linear_1"] == (3, 10)
    assert shapes["conv_weight"] == (16, 1, 3, 3)
    assert {n.meta[ir.DTYPE] for n in gm.graph.nodes if n.op == "call_function"} == {"float32"}


def test_fake_run_records_what_a_real_run_does(monkeypatch):
    import fxquant.passes.propagate_shapes as ps

    fake = run(KeywordCNN(), (torch.randn(3, 1, 10, 10),), "propagate-shapes")
    calls = []
    monkeypatch.setattr(ps, "_run_fake", lambda gm, inputs: calls.append(1) or (_ for _ in ()).throw(
        RuntimeError("no fake kernel")))
    real = run(KeywordCNN(), (torch.randn(3, 1, 10, 10),), "propagate-shapes")     # falls back to a real run
    assert calls == [1]
    def key(gm):
        return {n.name: (n.meta[ir.SHAPE], n.meta[ir.DTYPE]) for n in gm.graph.nodes if n.op != "output"}

    assert key(fake) == key(real) and key(real)["linear_1"] == ((3, 10), "float32")


def test_data_dependent_shapes_fall_back_to_a_real_run():
    class Nonzero(torch.nn.Module):
        def forward(self, x):
            return torch.nonzero(x > 0).float().sum() + x

    x = torch.tensor([[1.0, -1.0, 2.0]])
    gm = run(Nonzero(), (x,), "propagate-shapes")
    shapes = {n.name: n.meta[ir.SHAPE] for n in gm.graph.nodes if n.op == "call_function"}
    assert shapes["nonzero"] == (2, 2)         # two positive entries: a shape only the data decides
