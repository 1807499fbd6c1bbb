"""Edges of compile_lowbit from issue 13: options checked before any work, fallback, devices, empty
shapes, wrong input counts, NaN inputs, and weights fxquant cannot quantize (LSTM) counted and named."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.errors import ConfigError, InputError

X = torch.randn(3, 64)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"act_mode": "x"}, "act_mode must be 'dynamic' or 'static', got 'x'"),
        ({"symmetric": "no"}, "symmetric must be True or False, got 'no'"),
        ({"group_size": 0}, "group_size must be a positive integer"),
        ({"group_size": True}, "group_size must be a positive integer"),
        (
            {"target": "bogus"},
            "target must be one of ('native', 'avx512', 'avx2', 'portable', 'reference'), got 'bogus'",
        ),
        ({"act_bits": 4}, "act_bits must be 8 or None"),
        ({"dump_mode": "some"}, "dump_mode must be 'all', 'changed' or 'failure'"),
        ({"capture_method": "jit"}, "capture_method must be 'auto', 'export' or 'symbolic'"),
        ({"max_calibration": 0}, "max_calibration must be a positive integer"),
        ({"depthwise_bits": 5}, "depthwise_bits must be None or one of (8, 4, 3, 2)"),
        ({"fallback": "yes"}, "fallback must be True or False"),
        ({"rules": {"0": 5}}, "rule '0': bits must be one of (8, 4, 3, 2)"),
    ],
)
def test_options_are_checked_before_any_work(options, needle, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("compile_lowbit started working before checking its options")

    monkeypatch.setattr("fxquant.api.capture", no_work)
    monkeypatch.setattr("fxquant.api._materialize_calibration", no_work)
    with pytest.raises(ConfigError) as info:
        fxquant.compile_lowbit(_mlp(), (X,), bits=4, **options)
    assert needle in str(info.value)


def test_fallback_without_a_compiler_compiles_for_the_reference_path(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    model = _mlp()
    with pytest.warns(UserWarning, match=r"fallback=True: no C compiler found.*target='reference'"):
        cm = fxquant.compile_lowbit(model, (X,), bits=8, fallback=True)
    assert {r["backend"] for r in cm.report_rows()} == {"reference"}
    assert cm.config["target"] == "reference"
    torch.testing.assert_close(cm(X), model(X), rtol=0.05, atol=0.05)


def test_fallback_reaches_the_codegen_pass():
    cm = fxquant.compile_lowbit(_mlp(), (X,), bits=4, fallback=True, target="portable")
    assert cm.pipeline.endswith("codegen{target=portable,fallback=true},int8-kv-inputs")


def test_meta_device_inputs_and_models_are_clear_errors():
    with pytest.raises(ConfigError, match="example_inputs\\[0\\] is on device meta"):
        fxquant.compile_lowbit(_mlp(), (torch.empty(3, 64, device="meta"),), bits=4)
    with torch.device("meta"):
        meta_model = nn.Linear(64, 8)
    with pytest.raises(ConfigError, match="weight is on device meta"):
        fxquant.compile_lowbit(meta_model, (X,), bits=4)


def test_an_empty_layer_and_an_empty_batch_are_clear_errors():
    with pytest.raises(ConfigError, match=r"module '0' \(Linear\) has an empty weight of shape \(0, 64\)"):
        fxquant.compile_lowbit(nn.Sequential(nn.Linear(64, 0)).eval(), (X,), bits=4)
    with pytest.raises(
        ConfigError, match=r"example_inputs\[0\] has shape \(0, 64\) with a zero-size dimension"
    ):
        fxquant.compile_lowbit(_mlp(), (torch.randn(0, 64),), bits=4)


@pytest.mark.parametrize("target", ["native", "reference"])
def test_a_batch_of_zero_at_call_time_gives_an_empty_output(target):
    cm = fxquant.compile_lowbit(_mlp(), (X,), bits=4, target=target)
    assert cm(torch.randn(0, 64)).shape == (0, 8)


def test_two_inputs_for_a_one_input_module_is_an_input_error():
    cm = fxquant.compile_lowbit(_mlp(), (X,), bits=4, target="reference")
    with pytest.raises(InputError, match=r"takes 1 input \(input\), got 2"):
        cm(X, X)
    with pytest.raises(InputError, match="device meta"):
        cm(torch.empty(3, 64, device="meta"))


@pytest.mark.parametrize("target", ["native", "reference"])
def test_nan_input_rows_give_nan_output_rows(target):
    cm = fxquant.compile_lowbit(nn.Sequential(nn.Linear(64, 8)).eval(), (X,), bits=4, target=target)
    x = X.clone()
    x[1, 5] = float("nan")
    assert torch.isnan(cm(x)).any(1).tolist() == [False, True, False]


class LSTMTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(20, 32)
        self.rnn = nn.LSTM(32, 32, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.rnn(self.proj_in(x))[0])


def test_weights_of_layers_without_a_kernel_are_counted_and_named():
    model = LSTMTagger().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = fxquant.compile_lowbit(model, (torch.randn(2, 7, 20),), bits=4, target="reference")
    messages = [str(w.message) for w in caught if "stay fp32" in str(w.message)]
    assert len(messages) == 1 and "rnn (lstm, 8192 weights)" in messages[0]
    rows = {r["module"]: r for r in cm.report_rows()}
    assert rows["rnn"]["format"] == "float" and rows["rnn"]["decided_by"] == "no quantized kernel"
    assert rows["rnn"]["params"] == 2 * 4 * 32 * 32
    lstm_bytes = sum(p.numel() * 4 for p in model.rnn.parameters())
    assert rows["rnn"]["bytes"] == lstm_bytes
    params = {"proj_in": 20 * 32, "rnn": 8192, "head": 32 * 5}
    expected = (4 * (params["proj_in"] + params["head"]) + 32 * params["rnn"]) / sum(params.values())
    assert cm.summary()["avg_weight_bits"] == pytest.approx(expected)
    assert "lstm" in cm.report() and f"average weight bits {expected:.2f} over 3 weight nodes" in cm.report()
