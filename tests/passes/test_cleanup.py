from __future__ import annotations

import torch
from torch import nn

from fxquant import ir

from .helpers import node, run, targets

aten = torch.ops.aten


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)
        self.drop2d = nn.Dropout2d(0.3)

    def forward(self, x):
        y = self.drop(self.fc(x)) * 1 + 0
        y = y.reshape(y.shape).clone()
        unused = torch.relu(y)  # noqa: F841  dead
        z = self.drop2d(y[:, :, None, None]).flatten(1)
        return z.to(torch.float32)


def test_removes_dropout_identity_noops_and_dead_code():
    model, x = Noisy(), torch.randn(3, 8)
    before = run(model, (x,), "propagate-shapes")
    assert aten.dropout.default in targets(before) and aten.relu.default in targets(before)
    gm = run(model, (x,), "cleanup")
    assert targets(gm) == [
        aten.linear.default,
        aten.unsqueeze.default,
        aten.unsqueeze.default,
        aten.flatten.using_ints,
    ]
    assert any("removed (was dropout" in p for p in node(gm, "flatten").meta[ir.PROVENANCE])
    assert any("removed (was a no-op reshape" in p for p in node(gm, "unsqueeze").meta[ir.PROVENANCE])
    torch.testing.assert_close(gm(x), model.eval()(x))


def test_options_keep_selected_ops():
    model, x = Noisy(), torch.randn(3, 8)
    gm = run(model, (x,), "cleanup{dropout=false,dead_code=false}")
    assert aten.dropout.default in targets(gm) and aten.relu.default in targets(gm)
    assert aten.clone.default not in targets(gm)


def test_message_counts_what_was_removed():
    import fxquant

    cm = fxquant.compile_lowbit(Noisy().eval(), (torch.randn(3, 8),), passes="cleanup")
    msg = cm.timings[0].message
    assert msg.startswith("removed ") and "dropout" in msg and "dead" in msg
