"""capture(): one canonical graph from torch.export or symbolic_trace, with module names and source lines."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant import ir
from fxquant.tracing import _module_path
from fxquant.zoo import KeywordCNN

from .acceptance_models import ConformerBlock, LSTMRecognizer


def _call_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_export_gives_aten_nodes_with_module_and_source():
    gm = fxquant.capture(KeywordCNN().eval(), (torch.randn(1, 1, 10, 10),))
    aten = torch.ops.aten
    assert _call_targets(gm) == [aten.conv2d.default, aten.relu.default, aten.flatten.using_ints,
                                 aten.linear.default, aten.relu.default, aten.linear.default]
    by_target = {n.name: n for n in gm.graph.nodes}
    assert by_target["conv2d"].meta[ir.MODULE] == "conv"
    assert by_target["conv2d"].meta[ir.MODULE_TYPE] == "Conv2d"
    assert by_target["linear"].meta[ir.MODULE] == "fc1"
    # the relu is written in KeywordCNN.forward, in fxquant/zoo.py
    assert by_target["relu"].meta[ir.SOURCE].startswith("zoo.py:")
    assert all(n.meta[ir.PROVENANCE] == ("capture: export",) for n in gm.graph.nodes)
    assert [n.op for n in gm.graph.nodes if n.target == "conv.weight"] == ["get_attr"]


def test_symbolic_method_reaches_the_same_canonical_form():
    model, x = KeywordCNN().eval(), torch.randn(2, 1, 10, 10)
    a = fxquant.capture(model, (x,), method="export")
    b = fxquant.capture(model, (x,), method="symbolic")
    assert _call_targets(a) == _call_targets(b)
    assert [n.meta[ir.MODULE] for n in a.graph.nodes if n.op == "call_function"] == \
           [n.meta[ir.MODULE] for n in b.graph.nodes if n.op == "call_function"]
    assert torch.equal(a(x), b(x))


def test_dynamic_time_axis_is_kept():
    model = ConformerBlock().eval()
    gm = fxquant.capture(model, (torch.randn(2, 50, 64),))
    for t in (30, 77):
        x = torch.randn(2, t, 64)
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_lstm_is_captured_but_specialised_to_its_length():
    model = LSTMRecognizer().eval()
    x = torch.randn(2, 40, 50)
    gm = fxquant.capture(model, (x,))
    assert torch.ops.aten.lstm.input in [n.target for n in gm.graph.nodes]
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match="Guard failed"):
        gm(torch.randn(2, 40, 30))


@pytest.mark.parametrize("raw,expected", [
    ("encoder.blocks.0.attn", "encoder.blocks.0.attn"),
    ("L['self'].encoder.conv1", "encoder.conv1"),
    ("L__self___fc", "fc"),
    ("getattr(L['self'].blocks, '3').mlp", "blocks.3.mlp"),
    ("L['self'].layers[2]", "layers.2"),
])
def test_module_path_normalisation(raw, expected):
    assert _module_path(raw) == expected


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 8)

    def forward(self, x):
        y = self.gate(x)
        if y.mean() > 0:  # Python control flow on a tensor value
            return y
        return -y


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 8), DataDependent())

    def forward(self, x):
        return self.encoder(x)


def test_untraceable_model_names_module_line_messages_and_remedies():
    with pytest.raises(fxquant.CaptureError) as info:
        fxquant.capture(Wrapper(), (torch.randn(2, 8),))
    msg = str(info.value)
    assert "torch.export with dynamic batch/time dims failed in module 'encoder.1' (DataDependent)" in msg
    assert "torch.export with the example inputs' static shapes failed in module 'encoder.1'" in msg
    assert "torch.fx.symbolic_trace failed in module 'encoder.1'" in msg
    assert "test_capture.py:" in msg and "if y.mean() > 0" in msg
    assert "symbolically traced variables cannot be used as inputs to control flow" in msg
    assert "submodules=" in msg and "leaf" in msg


@pytest.mark.parametrize("model,inputs,needle", [
    ("not a module", (torch.randn(1),), "must be a torch.nn.Module"),
    (nn.Linear(4, 2), "oops", "example_inputs must be a tuple of tensors"),
    (nn.Linear(4, 2), ({"x": 1},), "example_inputs[0] is a dict"),
    (nn.Linear(4, 2), (torch.randn(3, 5),), "when run eagerly on the example inputs ((3, 5) float32)"),
    (nn.Linear(4, 2), (torch.full((1, 4), float("nan")),), "NaN or +Inf"),
    (nn.Linear(4, 2), (torch.full((1, 4), float("inf")),), "NaN or +Inf"),
])
def test_bad_inputs_are_clear_errors(model, inputs, needle):
    with pytest.raises(fxquant.FxQuantError) as info:
        fxquant.capture(model, inputs)
    assert needle in str(info.value)


def test_capture_restores_training_flags():
    model = ConformerBlock().train()
    fxquant.capture(model, (torch.randn(2, 12, 64),))
    assert all(m.training for m in model.modules())


def test_unknown_method():
    with pytest.raises(fxquant.ConfigError, match="capture method must be one of"):
        fxquant.capture(nn.Linear(2, 2), (torch.randn(1, 2),), method="jit")


def _openai_whisper():
    whisper_model = pytest.importorskip("whisper.model", reason="openai-whisper is not installed")
    torch.manual_seed(0)
    decoder = whisper_model.TextDecoder(n_vocab=60, n_ctx=16, n_state=32, n_head=4, n_layer=2).eval()
    with torch.no_grad():
        decoder.positional_embedding.normal_(0, 0.1)  # openai-whisper leaves it uninitialised (torch.empty)
    encoder = whisper_model.AudioEncoder(n_mels=16, n_ctx=12, n_state=32, n_head=4, n_layer=2).eval()
    return decoder, encoder


def test_a_failed_dynamic_export_does_not_poison_the_static_rung():
    """openai-whisper's TextDecoder: dynamic export fails (is_causal becomes a SymBool), static works."""
    decoder, _ = _openai_whisper()
    tokens, audio = torch.randint(0, 60, (2, 5)), torch.randn(2, 12, 32)
    gm = fxquant.capture(decoder, (tokens, audio))
    assert gm.meta["fxquant_capture_rung"] == "export-static"
    torch.testing.assert_close(gm(tokens, audio), decoder(tokens, audio), rtol=1e-5, atol=1e-5)
    assert not hasattr(tokens, "_dynamo_weak_dynamic_indices")  # the caller's tensors carry no tracer marks
    with pytest.raises(fxquant.CaptureError) as info:
        fxquant.capture(decoder, (tokens, audio), method="symbolic")
    assert "torch.fx.symbolic_trace failed" in str(info.value)


@pytest.mark.slow   # a full real-size compile (CI runs the slow tier)
def test_openai_whisper_decoder_and_encoder_compile_directly():
    decoder, encoder = _openai_whisper()
    tokens, audio, mel = torch.randint(0, 60, (2, 5)), torch.randn(2, 12, 32), torch.randn(2, 16, 24)
    with torch.no_grad():
        cd = fxquant.compile_lowbit(decoder, (tokens, audio), bits=8)
        ce = fxquant.compile_lowbit(encoder, (mel,), bits=8)
        for cm, model, inputs in ((cd, decoder, (tokens, audio)), (ce, encoder, (mel,))):
            ref, out = model(*inputs), cm(*inputs)
            assert float((out - ref).norm() / ref.norm()) < 0.05
            assert all(r["format"].startswith("W8") for r in cm.report_rows())
