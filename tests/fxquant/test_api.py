"""compile_lowbit's contract: options, errors, submodules, the drop-in module and its report."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import fxquant
from fxquant.zoo import KeywordCNN

HYGIENE = "cleanup,fold-bn,const-fold,propagate-shapes"
X = torch.randn(2, 1, 10, 10)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"bits": 5}, "bits must be one of (8, 4, 3, 2)"),
        ({"bits": 4, "avg_bits": 3.0}, "give one of bits, avg_bits or budget_bytes, not bits and avg_bits"),
        ({"avg_bits": 0.5}, "avg_bits must be a number in (1, 32]"),
        ({"budget_bytes": -3}, "budget_bytes must be a positive integer"),
        ({"scheme": "lut"}, "scheme must be one of"),
        ({"rules": [("fc1", 4)]}, "rules must be a dict"),
        ({"calibration": []}, "calibration is empty"),
        ({"calibration": torch.randn(3)}, "not a single tensor"),
        ({"calibration": ["text"]}, "calibration items must be tensors or tuples"),
        ({"target": 3}, "target must be a string"),
        ({"bitz": 4}, "unknown option 'bitz' (did you mean 'bits'?)"),
        (
            {"submodules": ["decoder"]},
            "submodules pattern 'decoder' matches no module; top-level modules are: conv, fc1, fc2",
        ),
    ],
)
def test_bad_options_are_clear_errors(kwargs, needle):
    with pytest.raises(fxquant.ConfigError) as info:
        fxquant.compile_lowbit(KeywordCNN().eval(), (X,), passes=HYGIENE, **kwargs)
    assert needle in str(info.value)


def test_nan_weights_are_rejected_with_the_parameter_name():
    model = KeywordCNN().eval()
    with torch.no_grad():
        model.fc1.weight[3, 7] = float("nan")
    with pytest.raises(fxquant.ConfigError, match=r"fc1.weight has 1 NaN/Inf values"):
        fxquant.compile_lowbit(model, (X,), passes=HYGIENE)


def test_drop_in_module_keeps_signature_and_accepts_keywords():
    model = KeywordCNN().eval()
    cm = fxquant.compile_lowbit(model, (X,), passes=HYGIENE)
    assert isinstance(cm, nn.Module) and isinstance(cm.graph_module, torch.fx.GraphModule)
    assert list(inspect.signature(cm).parameters) == ["x"]
    torch.testing.assert_close(cm(x=X), model(X))
    assert "def forward" in cm.code


def test_report_lists_weight_nodes_and_pass_timings():
    cm = fxquant.compile_lowbit(KeywordCNN().eval(), (X,), passes=HYGIENE)
    rows = cm.report_rows()
    assert [(r["module"], r["op"], r["weight"], r["format"]) for r in rows] == [
        ("conv", "conv2d", "9->16", "float"),
        ("fc1", "linear", "1600->128", "float"),
        ("fc2", "linear", "128->10", "float"),
    ]
    text = cm.report(passes=True)
    assert "average weight bits 32.00 over 3 weight nodes" in text
    assert "propagate-shapes" in text and "recorded shapes" in text
    assert (
        cm.summary()["model_bytes"]
        == cm.summary()["fp32_bytes"]
        == 4 * sum(p.numel() for p in KeywordCNN().parameters())
    )


class Looping(nn.Module):
    """A model whose own forward has a Python loop over a data-dependent length."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.step = nn.Linear(8, 8)

    def forward(self, x):
        h = self.encoder(x)
        steps = 0
        while h.norm() > 1.0 and steps < 20:  # untraceable: depends on values
            h = self.step(h) * 0.5
            steps += 1
        return h


def test_submodules_compile_separately_and_the_python_loop_still_runs(tmp_path):
    model = Looping().eval()
    x = torch.randn(3, 8)
    with pytest.raises(fxquant.CaptureError):
        fxquant.capture(model, (x,))
    cm = fxquant.compile_lowbit(
        model, (x,), passes=HYGIENE, submodules=["encoder", "ste*"], dump_dir=tmp_path
    )
    assert sorted(cm.compiled) == ["encoder", "step"]
    assert isinstance(cm.encoder, fxquant.CompiledModule)
    torch.testing.assert_close(cm(x), model(x))
    assert (tmp_path / "encoder" / "04-propagate-shapes.txt").exists()
    assert "step" in cm.report() and "whole model" in cm.report()


def test_nested_submodule_patterns_keep_the_outermost():
    cm = fxquant.compile_lowbit(
        Looping().eval(), (torch.randn(3, 8),), passes=HYGIENE, submodules=["encoder", "encoder.*"]
    )
    assert cm.compiled_names == ["encoder"]


def test_submodule_that_never_runs_is_an_error():
    class Unused(Looping):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(2, 2)

    with pytest.raises(fxquant.ConfigError, match="submodule 'spare' was not called"):
        fxquant.compile_lowbit(Unused().eval(), (torch.randn(3, 8),), passes=HYGIENE, submodules=["spare"])


def test_specialised_shapes_raise_input_error():
    from .acceptance_models import LSTMRecognizer

    model = LSTMRecognizer().eval()
    cm = fxquant.compile_lowbit(model, (torch.randn(1, 40, 20),), passes=HYGIENE)
    with pytest.raises(fxquant.errors.InputError, match="specialised to"):
        cm(torch.randn(1, 40, 33))
