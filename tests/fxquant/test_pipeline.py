"""Pipeline text: parse/print round trip, option coercion, and errors that list what is valid."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

import torch

import fxquant
from fxquant.pipeline import Pipeline, PassSpec
from fxquant.registry import PassResult, register_pass, unregister_pass


@dataclass
class _Opts:
    ratio: float = 0.5
    count: int = 3
    flag: bool = False
    label: str = "x"
    limit: int | None = None


@pytest.fixture
def typed_pass():
    @register_pass("typed-test-pass", options=_Opts, kind="analysis")
    def typed(gm, ctx):
        return PassResult(message=str(ctx.options))

    yield "typed-test-pass"
    unregister_pass("typed-test-pass")


@pytest.mark.parametrize("text", [
    "cleanup",
    "cleanup,fold-bn,const-fold,propagate-shapes",
    "cleanup{dead_code=false,dropout=true},fold-bn,const-fold{max_growth=2.5}",
])
def test_round_trip(text):
    assert str(Pipeline.parse(text)) == text


def test_options_are_coerced_to_their_types(typed_pass):
    p = Pipeline.parse(f"{typed_pass}{{ratio=0.25,count=7,flag=yes,label=abc,limit=None}}")
    opts = p.steps[0].build_options()
    assert opts == _Opts(ratio=0.25, count=7, flag=True, label="abc", limit=None)
    assert Pipeline.parse(f"{typed_pass}{{limit=12}}").steps[0].build_options().limit == 12


def test_list_form_matches_text_form(typed_pass):
    p = Pipeline.coerce(["cleanup", (typed_pass, {"count": 4, "flag": True}), PassSpec("fold-bn")])
    assert str(p) == f"cleanup,{typed_pass}{{count=4,flag=True}},fold-bn"
    assert p.steps[1].build_options().count == 4


@pytest.mark.parametrize("text,needles", [
    ("cleanup,fold-bnn", ["unknown pass 'fold-bnn'", "Did you mean 'fold-bn'", "Valid passes: ", "cleanup"]),
    ("cleanup{dead=1}", ["pass 'cleanup' has no option 'dead'", "valid options: dropout: bool"]),
    ("cleanup{dead_code=maybe}", ["option cleanup.dead_code expects bool, got 'maybe'"]),
    ("const-fold{max_growth=lots}", ["option const-fold.max_growth expects float, got 'lots'"]),
    ("fold-bn{x=1}", ["pass 'fold-bn' takes no options"]),
    ("cleanup,,fold-bn", ["empty pass name"]),
    ("cleanup{dead_code=false", ["unbalanced '{'"]),
    ("cleanup{dead_code}", ["must be key=value"]),
    ("", ["pipeline text is empty"]),
])
def test_errors_list_valid_choices(text, needles):
    with pytest.raises(fxquant.PipelineError) as info:
        Pipeline.parse(text)
    for needle in needles:
        assert needle in str(info.value)


def test_wrong_typed_value_in_list_form(typed_pass):
    with pytest.raises(fxquant.PipelineError, match=r"typed-test-pass.count expects int, got '2.5'"):
        Pipeline.coerce([(typed_pass, {"count": 2.5})])


def test_default_pipeline_text():
    assert fxquant.default_pipeline("native").startswith(
        "cleanup,fold-bn,const-fold,linearize,propagate-shapes,calibrate"
    )
    assert fxquant.default_pipeline("avx2").endswith("codegen{target=avx2},int8-kv-inputs")   # inputs: last
    assert "codegen" not in fxquant.default_pipeline("reference")
    assert fxquant.default_pipeline("reference").endswith("lower-attention,int8-kv-inputs")
    assert ",calibrate{full_h=False}," in fxquant.default_pipeline("native", full_h=False)


def test_compile_lowbit_keeps_full_second_moments_only_for_gptq():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    plain = fxquant.compile_lowbit(model, (torch.randn(4, 16),), bits=4, target="reference")
    gptq = fxquant.compile_lowbit(model, (torch.randn(4, 16),), bits=4, target="reference", gptq=True)
    assert "calibrate{full_h=False}" in plain.pipeline and "full_h" not in gptq.pipeline
