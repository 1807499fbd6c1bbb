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
