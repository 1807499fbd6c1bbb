"""compile_jointly: one budget over several graphs, each part's sensitivity on its own number of batches."""
from __future__ import annotations

import torch
from torch import nn

from fxquant.asr.compiled import PACK_GAP_SECONDS, PACK_SECONDS, _packed_sweep, pack_clips
from fxquant.asr.joint import PartSpec, compile_jointly
from fxquant.rules import asks_for_gptq


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


def test_a_part_can_measure_on_its_own_inputs():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    items = [(torch.randn(4, 16),) for _ in range(3)]
    own = [(torch.randn(7, 16),)]
    seen = []
    readout = lambda out, i: seen.append((out.shape[0], i)) or out      # noqa: E731
    cm, = compile_jointly([PartSpec("own", mlp, items[0], items, readout, sensitivity_inputs=own)],
                          avg_bits=4, target="reference", max_batches=4)
    assert "on 1 batches" in _sensitivity_message(cm)
    assert seen and set(seen) == {(7, 0)}          # every measurement ran on the 7-row input, index 0
    assert "sensitivity_inputs" not in cm.config    # compile-time data is not kept in the module


def test_whisper_encoder_is_measured_on_a_packed_window_only_under_the_anchored_sweep():
    assert _packed_sweep(4.0) and _packed_sweep(6.0)
    assert not _packed_sweep(3.0) and not _packed_sweep(None)


def test_pack_clips_joins_whole_clips_with_gaps_up_to_the_limit():
    sr = 16000
    clips = [torch.full((sr * 9,), float(i + 1)) for i in range(4)]
    packed = pack_clips(clips)
    gap = int(PACK_GAP_SECONDS * sr)
    assert packed.numel() == 3 * 9 * sr + 2 * gap <= PACK_SECONDS * sr      # the fourth clip does not fit
    assert torch.equal(packed[:9 * sr], clips[0]) and not packed[9 * sr:9 * sr + gap].any()
    assert torch.equal(packed[-9 * sr:], clips[2])
    long = [torch.ones(sr * 40), torch.ones(sr)]
    assert pack_clips(long).numel() == 40 * sr                             # a long first clip alone


def test_full_second_moments_only_when_gptq_reads_them(monkeypatch):
    import fxquant.passes.calibrate as calibrate

    wanted = []
    init = calibrate.NodeObserver.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        wanted.append(self.want_h)

    monkeypatch.setattr(calibrate.NodeObserver, "__init__", spy)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    items = [(torch.randn(4, 16),) for _ in range(2)]
    compile_jointly([PartSpec("p", mlp, items[0], items, lambda out, i: out)], avg_bits=4, target="reference")
    assert wanted == [False, False]
    compile_jointly([PartSpec("p", mlp, items[0], items, lambda out, i: out)], avg_bits=4, target="reference",
                    gptq=True)
    assert wanted[2:] == [True, True]
    assert not asks_for_gptq({"avg_bits": 4})
    assert asks_for_gptq({"gptq": True}) and asks_for_gptq({"rules": {"op:linear": {"rounding": "gptq"}}})
    assert not asks_for_gptq({"rules": {"op:linear": {"bits": 8}}})


def test_decoder_side_parts_measure_on_the_richest_transcripts_first():
    from fxquant.asr.compiled import WhisperCalibration, _joint_parts

    digits = torch.tensor([[1, 5, 5, 5, 5]])
    english = torch.tensor([[1, 7, 8, 9, 10, 11]])
    cal = WhisperCalibration(mels=[torch.zeros(1, 2, 3)] * 2, audio=[torch.zeros(1, 4, 2), torch.ones(1, 4, 2)],
                             cross=[torch.zeros(1)] * 2, tokens=[digits, english])
    specs = [("encoder", None, [("mel0",), ("mel1",)]), ("cross", None, [("a0",), ("a1",)]),
             ("step", None, [("s0",), ("s1",)])]
    parts = {p.name: p for p in _joint_parts(None, cal, specs)}
    assert parts["step"].sensitivity_inputs == [("s1",), ("s0",)]          # the English window first
    assert parts["cross"].sensitivity_inputs == [("a1",), ("a0",)]
    assert parts["encoder"].sensitivity_inputs is None                     # no packed window: its own items
    assert parts["step"].calibration == [("s0",), ("s1",)]                 # calibration keeps every item


def test_a_parts_default_rules_yield_to_the_compiles_own():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    items = [(torch.randn(4, 16),) for _ in range(2)]
    part = PartSpec("p", mlp, items[0], items, lambda out, i: out, rules={"*": {"min_bits": 5}})
    cm, = compile_jointly([part], avg_bits=5, target="reference")
    assert {r["format"].split()[0] for r in cm.report_rows()} == {"W5"}     # floor 5 at an average of 5
    free, = compile_jointly([PartSpec("p", mlp, items[0], items, lambda out, i: out)], avg_bits=5,
                            target="reference")
    assert [r["format"].split()[0] for r in free.report_rows()] == ["W4", "W6"]   # measured without it
    own, = compile_jointly([part], avg_bits=5, target="reference", rules={"*": 8, "0": 2})
    assert [r["format"].split()[0] for r in own.report_rows()] == ["W2", "W8"]   # same pattern: the compile's
