"""int8-kv-inputs: a graph input read only as constant int8 attention keys/values becomes (codes, scales)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
import fxquant.kv_rows as kv_rows
from fxquant.errors import InputError
from fxquant.models.whisper import DecoderStep, ModelDimensions, whisper_random
from fxquant.ops import FusedAttention

DIMS = ModelDimensions(16, 12, 32, 4, 1, 50, 24, 32, 4, 2)


@pytest.fixture(scope="module")
def whisper_step():
    """A random-weight Whisper decoder step compiled with and without the pass, and its inputs."""
    torch.manual_seed(0)
    model = whisper_random(DIMS, seed=0)
    cross = model.decoder.cross_cache(torch.randn(2, DIMS.n_audio_ctx, DIMS.n_audio_state))
    example = (torch.tensor([[1, 5, 7]] * 2), cross, model.decoder.empty_cache(2), torch.tensor(0))
    step = fxquant.compile_lowbit(DecoderStep(model.decoder), example, bits=8)
    without = fxquant.compile_lowbit(DecoderStep(model.decoder), example, bits=8,
                                     passes=fxquant.default_pipeline().replace(",int8-kv-inputs", ""))
    return model, step, without, example


def _attention_calls(cm):
    gm = cm.graph_module
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                  FusedAttention)]


def test_the_cross_cache_input_becomes_codes_and_scales(whisper_step):
    _, step, without, _ = whisper_step
    names = [it["name"] for it in step.input_spec.items]
    assert names == ["tokens", "cross_kv_int8", "cross_kv_scale", "self_kv", "offset"]
    assert step.input_spec.row_inputs == {1: "cross_kv"}
    items = step.input_spec.items
    assert (items[1]["dtype"], items[1]["format"], items[2]["dtype"], items[2]["format"]) == \
        (torch.int8, "int8-rows", torch.float32, "row-scales")
    assert items[2]["shape"][-1] == 1 and items[1]["shape"][:-1] == items[2]["shape"][:-1]
    assert any("1 input(s) taken as int8 rows + scales (cross_kv)" in t.message for t in step.timings)
    calls = _attention_calls(step)
    cross_calls = [n for n in calls if n.args[4:] and n.args[4] is not None]
    assert len(calls) == 2 * DIMS.n_text_layer and len(cross_calls) == DIMS.n_text_layer
    for n in cross_calls:      # keys and values read the codes, their scales the scale input, through views
        assert n.args[5] is not None and n.args[1].args[0].args[0].target == "cross_kv_int8"
        assert n.args[4].args[0].args[0].target == "cross_kv_scale"
    assert "cross_kv" in without.input_spec.names() and not without.input_spec.row_inputs


def test_float_and_pair_inputs_give_the_numbers_of_the_per_op_conversion(whisper_step):
    model, step, without, (tokens, cross, _, _) = whisper_step
    ref, _ = without(tokens, cross, model.decoder.empty_cache(2), torch.tensor(0))
    from_float, _ = step(tokens, cross, model.decoder.empty_cache(2), torch.tensor(0))
    codes, scales = step.int8_rows(cross)
    assert (codes.dtype, tuple(scales.shape)) == (torch.int8, (*cross.shape[:-1], 1))
    from_pair, _ = step(tokens, (codes, scales), model.decoder.empty_cache(2), torch.tensor(0))
    assert torch.equal(from_float, ref) and torch.equal(from_pair, ref)
    window = torch.empty_like(codes[:1]), torch.empty_like(scales[:1])     # one window into a batch buffer
    step.int8_rows(cross[1:], out=window)
    assert torch.equal(window[0], codes[1:]) and torch.equal(window[1], scales[1:])


def test_a_float_input_is_converted_once_per_tensor(whisper_step, monkeypatch):
    model, step, _, (tokens, cross, _, _) = whisper_step
    calls = []
    real = kv_rows.quantize_rows
    monkeypatch.setattr(kv_rows, "quantize_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    step.forget_inputs()
    cross = cross.clone()
    first, _ = step(tokens, cross, model.decoder.empty_cache(2), torch.tensor(0))
    step(tokens, cross, model.decoder.empty_cache(2), torch.tensor(0))
    assert len(calls) == 1                                  # the same unmodified tensor: reused
    cross.mul_(2)                                           # written in place: converted again
    again, _ = step(tokens, cross, model.decoder.empty_cache(2), torch.tensor(0))
    assert len(calls) == 2 and not torch.equal(first, again)


def test_a_wrong_form_says_what_the_input_takes(whisper_step):
    model, step, _, (tokens, cross, _, _) = whisper_step
    with pytest.raises(InputError, match="takes per-row int8 keys/values.*quantize_rows; got list"):
        step(tokens, [cross, cross], model.decoder.empty_cache(2), torch.tensor(0))
    codes, scales = step.int8_rows(cross)
    with pytest.raises(InputError, match="got tuple of 1"):
        step(tokens, (codes,), model.decoder.empty_cache(2), torch.tensor(0))
    with pytest.raises(InputError, match="cross_kv_scale"):
        step(tokens, (codes, scales[..., :1, :]), model.decoder.empty_cache(2), torch.tensor(0))


def test_the_artifact_keeps_the_input_form(whisper_step, tmp_path):
    model, step, _, (tokens, cross, _, _) = whisper_step
    step.save(tmp_path / "step")
    inputs = json.loads((tmp_path / "step" / "manifest.json").read_text())["inputs"]
    assert [it.get("format") for it in inputs] == [None, "int8-rows", "row-scales", None, None]
    loaded = fxquant.load(tmp_path / "step")
    ref, _ = step(tokens, cross, model.decoder.empty_cache(2), torch.tensor(0))
    out, _ = loaded(tokens, loaded.int8_rows(cross), model.decoder.empty_cache(2), torch.tensor(0))
    again, _ = loaded(tokens, cross, model.decoder.empty_cache(2), torch.tensor(0))
    assert torch.equal(out, ref) and torch.equal(again, ref)


class Attention(nn.Module):
    """A query projected from x (2 heads of 8) over keys/values given as inputs; `kv` picks them."""

    def __init__(self, kv=lambda k, v: (k, v), extra=lambda k: 0):
        super().__init__()
        self.q, self.kv, self.extra = nn.Linear(16, 16), kv, extra

    def forward(self, x, k, v):
        q = self.q(x).view(1, -1, 2, 8).transpose(1, 2)
        kk, vv = self.kv(k, v)
        return F.scaled_dot_product_attention(q, kk, vv) + self.extra(k)


X = torch.randn(1, 1, 16)


def _compile(model, inputs):
    return fxquant.compile_lowbit(model.eval(), inputs, target="reference",
                                  passes="propagate-shapes,lower-attention,int8-kv-inputs")


def test_inputs_with_other_uses_or_last_axis_views_stay_float_with_the_reason():
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    cm = _compile(Attention(extra=lambda k: k.mean()), (X, k, v))         # k is also read by a mean
    message = cm.timings[-1].message
    assert "1 input(s) taken as int8 rows + scales (v)" in message and "kept float: k: " in message
    assert [it["name"] for it in cm.input_spec.items] == ["x", "k", "v_int8", "v_scale"]
    halves = Attention(kv=lambda k, v: (k[..., :8], k[..., 8:]))     # keys, values: halves of k's last axis
    cm = _compile(halves, (X, torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 8)))
    assert "views its last axis" in cm.timings[-1].message and not cm.input_spec.row_inputs


def test_slices_of_other_axes_are_followed_and_numbers_match(tmp_path):
    k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    model = Attention(kv=lambda k, v: (k[:, :, 1:], v[:, :, 1:])).eval()
    cm = _compile(model, (X, k, v))
    assert cm.input_spec.row_inputs == {1: "k", 2: "v"}
    q = model.q(X).view(1, -1, 2, 8).transpose(1, 2)
    kq, ks = fxquant.qweight.quantize_activation_per_row(k[:, :, 1:])
    vq, vs = fxquant.qweight.quantize_activation_per_row(v[:, :, 1:])
    want = F.scaled_dot_product_attention(q, kq * ks, vq * vs)
    with torch.no_grad():
        torch.testing.assert_close(cm(X, k, v), want)
        torch.testing.assert_close(cm(X, cm.int8_rows(k), cm.int8_rows(v)), want)
    cm.save(tmp_path / "art")        # the float examples are stored as its self-test, run again at load
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["selftest"] is not None
    with torch.no_grad():
        torch.testing.assert_close(fxquant.load(tmp_path / "art")(X, k, v), want)


def test_nothing_to_do_is_said():
    cm = fxquant.compile_lowbit(nn.Linear(8, 8).eval(), (torch.randn(2, 8),), bits=8, target="reference")
    assert "no input is read only as constant int8 attention keys/values" in cm.timings[-1].message


def test_a_loaded_attention_call_must_pair_int8_codes_with_float_scales(whisper_step, tmp_path):
    _, step, _, _ = whisper_step
    step.save(tmp_path / "step")
    path = tmp_path / "step" / "manifest.json"
    m = json.loads(path.read_text())
    call = next(n for n in m["graph"]["nodes"] if n["op"] == "call_module" and len(n["args"]["tuple"]) == 6)
    call["args"]["tuple"][4] = call["args"]["tuple"][1]              # the key's codes given as its scales
    path.write_text(json.dumps(m))
    with pytest.raises(fxquant.ArtifactError, match="need float32 scales"):
        fxquant.load(tmp_path / "step")
