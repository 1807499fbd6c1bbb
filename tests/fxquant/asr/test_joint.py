"""compile_jointly: one budget over several graphs, each part's sensitivity on its own number of batches."""
from __future__ import annotations

import torch
from torch import nn

from fxquant.asr.compiled import ANCHORED_ENCODER_BATCHES, _encoder_batches
from fxquant.asr.joint import PartSpec, compile_jointly


def _sensitivity_message(cm) -> str:
    return next(t.message for t in cm.timings if t.name == "sensitivity")


def test_each_part_measures_on_its_own_batch_count():
    torch.manual_seed(0)
    mlps = [nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval() for _ in range(2)]
    items = [(torch.randn(4, 16),) for _ in range(3)]
    parts = [PartSpec("capped", mlps[0], items[0], items, lambda out, i: out, max_batches=2),
             PartSpec("default", mlps[1], items[0], items, lambda out, i: out)]
    capped, default = compile_jointly(parts, avg_bits=4, target="reference", max_batches=4)
    assert "on 2 batches" in _sensitivity_message(capped)
    assert "on 3 batches" in _sensitivity_message(default)     # all three items: fewer than max_batches
    parts[0].max_batches = 8                                   # a part's cap never raises the compile's
    capped, _ = compile_jointly(parts, avg_bits=4, target="reference", max_batches=1)
    assert "on 1 batches" in _sensitivity_message(capped)


def test_whisper_encoder_is_measured_on_fewer_windows_only_under_the_anchored_sweep():
    assert _encoder_batches(4.0) == _encoder_batches(6.0) == ANCHORED_ENCODER_BATCHES == 2
    assert _encoder_batches(3.0) is None and _encoder_batches(None) is None
