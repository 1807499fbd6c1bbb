from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.codegen import TARGETS
from fxquant.ops import FusedAttention
from fxquant.models.whisper import DecoderStep, ModelDimensions, whisper_random

SDPA = torch.ops.aten.scaled_dot_product_attention.default
DIMS = ModelDimensions(16, 12, 32, 4, 1, 50, 24, 32, 4, 2)


class CachedAttention(nn.Module):
    """Decode-style attention: a query over a fixed-size cache with an additive -inf mask."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.q, self.o = heads, nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, k_cache, v_cache, mask):
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        return self.o(att.transpose(1, 2).reshape(b, t, d))


class CausalAttention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _inputs(t=1, n_ctx=20, filled=7):
    mask = torch.zeros(t, n_ctx).masked_fill(torch.arange(n_ctx)[None] >= filled, float("-inf"))
    return torch.randn(1, t, 32), torch.randn(1, 4, n_ctx, 8), torch.randn(1, 4, n_ctx, 8), mask


def _pipeline(extra=""):
    return "cleanup,propagate-shapes,calibrate,assign-precision,quantize,lower,lower-attention" + extra


def test_sdpa_becomes_fused_attention_with_the_same_numbers():
    model, inputs = CachedAttention().eval(), _inputs()
    cm = fxquant.compile_lowbit(model, inputs, bits=8, passes=_pipeline(), target="reference")
    gm = cm.graph_module
    assert not [n for n in gm.graph.nodes if n.target is SDPA]
    ops = [m for m in gm.modules() if isinstance(m, FusedAttention)]
    assert len(ops) == 1 and ops[0].head_dim == 8 and ops[0].max_query_rows == 16 and ops[0].kv_int8
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FusedAttention))
    assert any("FusedAttention(head_dim=8)" in p for p in node.meta["fxq_provenance"])
    assert len(node.args) == 4                                   # q, k, v, mask
    ref = fxquant.compile_lowbit(model, inputs, bits=8, passes=_pipeline(",lower-attention{constant_kv=float32}")
                                 .replace(",lower-attention,", ","), target="reference")
    assert not [m for m in ref.graph_module.modules() if isinstance(m, FusedAttention) and m.kv_int8]
    x, k, v, mask = inputs
    # constant keys/values are used as per-row int8: close to float, exactly the int8 reference
    torch.testing.assert_close(cm(x, k, v, mask), ref(x, k, v, mask), rtol=0.02, atol=0.02)
    kq, ks = fxquant.qweight.quantize_activation_per_row(k)
    vq, vs = fxquant.qweight.quantize_activation_per_row(v)
    torch.testing.assert_close(ops[0](x.new_ones(1, 4, 1, 8), k, v, mask),
                               F.scaled_dot_product_attention(x.new_ones(1, 4, 1, 8), kq * ks, vq * vs, attn_mask=mask))
    assert any("1 attention calls lowered (1 with constant int8" in t.message for t in cm.timings)


def test_constant_kv_is_converted_once_per_unmodified_input():
    att = FusedAttention(head_dim=8, kv_int8=True)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    cache = torch.stack([k, v])
    first = att(q, cache[0], cache[1])
    packed = att._kv_memo._slots["k"][2]
    again = att(q, cache[0], cache[1])                          # new views of the same tensor: reused
    assert att._kv_memo._slots["k"][2] is packed and torch.equal(first, again)
    cache[0].mul_(2)                                            # written in place: converted again
    changed = att(q, cache[0], cache[1])
    assert att._kv_memo._slots["k"][2] is not packed and not torch.equal(changed, first)
    torch.testing.assert_close(changed, att.reference(q, cache[0], cache[1]))


def test_kernel_attached_and_matches_reference(tmp_path):
    model, (x, k, v, mask) = CachedAttention().eval(), _inputs(t=2, filled=9)
    cm = fxquant.compile_lowbit(model, (x, k, v, mask), bits=8, passes=_pipeline(",codegen{never_slower=false}"))
    op = next(m for m in cm.graph_module.modules() if isinstance(m, FusedAttention))
    assert op.backend.startswith("c:") and op.kernel is not None
    want = cm.graph_module(x, k, v, mask)
    op.kernel = None                                             # reference path: torch SDPA
    torch.testing.assert_close(cm.graph_module(x, k, v, mask), want, rtol=1e-5, atol=1e-5)
    # artifacts carry the op (no weights) and rebuild its kernel on load
    loaded = fxquant.load(cm.save(tmp_path / "att"))
    lop = next(m for m in loaded.graph_module.modules() if isinstance(m, FusedAttention))
    assert lop.head_dim == 8 and lop.backend.startswith("c:")
    torch.testing.assert_close(loaded(x, k, v, mask), want, rtol=1e-5, atol=1e-5)


def test_calls_the_kernel_cannot_serve_stay_aten_with_a_reason():
    q = torch.randn(1, 2, 5, 8)
    cm = fxquant.compile_lowbit(CausalAttention(), (q, q.clone(), q.clone()), passes="lower-attention",
                                target="reference")
    nodes = [n for n in cm.graph_module.graph.nodes if n.target is SDPA]
    assert len(nodes) == 1
    assert any("is_causal" in p for p in nodes[0].meta["fxq_provenance"])
    assert any("0 attention calls lowered (0 with constant int8 keys/values, 0 prefill), 1 left as aten" in t.message
               for t in cm.timings)


def test_bad_option_is_a_clear_error():
    with pytest.raises(fxquant.ConfigError, match="max_query_rows must be >= 1"):
        fxquant.compile_lowbit(CachedAttention().eval(), _inputs(), passes="lower-attention{max_query_rows=0}",
                               target="reference")


@torch.no_grad()
def test_whisper_decode_step_attention_is_lowered_and_cache_updated_in_place():
    model = whisper_random(DIMS, seed=0)
    audio = torch.randn(1, DIMS.n_audio_ctx, DIMS.n_audio_state)
    cross = model.decoder.cross_cache(audio)
    tokens = torch.tensor([[1, 5, 7]])
    step = fxquant.compile_lowbit(DecoderStep(model.decoder), (tokens, cross, model.decoder.empty_cache(1),
                                                               torch.tensor(0)), bits=8,
                                  passes=fxquant.default_pipeline().replace(",codegen", ",codegen{never_slower=false}"))  # kernels wanted
    ops = [m for m in step.graph_module.modules() if isinstance(m, FusedAttention)]
    assert len(ops) == 2 * DIMS.n_text_layer and all(m.backend.startswith("c:") for m in ops)
    # cross-attention reads the constant cross cache (int8); self-attention the cache the step writes
    assert sum(m.kv_int8 for m in ops) == DIMS.n_text_layer
    cache, ref_cache = model.decoder.empty_cache(1), model.decoder.empty_cache(1)
    logits, out_cache = step(tokens, cross, cache, torch.tensor(0))
    ref, _ = model.decoder.step(tokens, cross, ref_cache, torch.tensor(0))
    assert out_cache is cache                                   # written in place, not copied
    torch.testing.assert_close(cache, ref_cache, rtol=0.05, atol=0.05)
    assert float((logits - ref).norm() / ref.norm()) < 0.05
    nxt = torch.tensor([[9]])
    logits, _ = step(nxt, cross, cache, torch.tensor(3))
    ref, _ = model.decoder.step(nxt, cross, ref_cache, torch.tensor(3))
    assert float((logits - ref).norm() / ref.norm()) < 0.05


@torch.no_grad()
def test_kv_bits_none_keeps_constant_keys_values_float_and_the_report_says_so():
    model = whisper_random(DIMS, seed=0)
    audio = torch.randn(1, DIMS.n_audio_ctx, DIMS.n_audio_state)
    inputs = (torch.tensor([[1, 5, 7]]), model.decoder.cross_cache(audio), model.decoder.empty_cache(1),
              torch.tensor(0))
    reports = {}
    for kv_bits in (8, None):
        step = fxquant.compile_lowbit(DecoderStep(model.decoder), inputs, bits=8, kv_bits=kv_bits, target="reference")
        ops = [m for m in step.graph_module.modules() if isinstance(m, FusedAttention)]
        reports[kv_bits] = (sum(m.kv_int8 for m in ops), step.report())
    assert reports[8][0] == DIMS.n_text_layer and reports[None][0] == 0
    assert f"{DIMS.n_text_layer} read constant keys/values as per-row int8" in reports[8][1]
    assert "0 read constant keys/values as per-row int8" in reports[None][1]
    with pytest.raises(fxquant.ConfigError, match="kv_bits"):
        fxquant.compile_lowbit(DecoderStep(model.decoder), inputs, kv_bits=4, target="reference")


class EncoderAttention(nn.Module):
    """Encoder-style self-attention: many query rows, no mask, heads as views of [B, T, H*D]."""

    def __init__(self, d: int = 128, heads: int = 2):
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(d, 3 * d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in self.qkv(x).chunk(3, -1))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)


@pytest.mark.parametrize("option,rows", [("", 1 << 16), ("{prefill_rows=0}", 16), ("{prefill_rows=4096}", 4096)])
def test_unmasked_many_row_calls_get_prefill_rows(option, rows):
    x, model = torch.randn(1, 100, 128), EncoderAttention().eval()
    cm = fxquant.compile_lowbit(model, (x,), passes="lower-attention" + option,
                                target="reference")
    ops = [m for m in cm.graph_module.modules() if isinstance(m, FusedAttention)]
    assert len(ops) == 1 and ops[0].max_query_rows == rows and not ops[0].kv_int8
    node = next(n for n in cm.graph_module.graph.nodes if n.op == "call_module" and "attention" in n.target)
    assert any("prefill kernel (bf16)" in p for p in node.meta["fxq_provenance"]) == (rows > 16)
    assert any(f"keys/values, {int(rows > 16)} prefill)" in t.message for t in cm.timings)
    torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)   # no kernel here: torch SDPA


def test_masked_or_short_calls_keep_decode_rows():
    model, inputs = CachedAttention().eval(), _inputs(t=40)    # 40 query rows, but masked
    cm = fxquant.compile_lowbit(model, inputs, passes="lower-attention", target="reference")
    assert [m.max_query_rows for m in cm.graph_module.modules() if isinstance(m, FusedAttention)] == [16]
    with pytest.raises(fxquant.ConfigError, match="prefill_rows must be in"):
        fxquant.compile_lowbit(model, inputs, passes="lower-attention{prefill_rows=-1}", target="reference")


@pytest.mark.skipif(not TARGETS["avx512"].runnable(), reason="host cannot run avx512 kernels")
def test_encoder_attention_runs_the_prefill_kernel_and_never_slower_reports_its_choice():
    torch.manual_seed(0)
    model, x = EncoderAttention(d=384, heads=6).eval(), torch.randn(1, 300, 384)
    cm = fxquant.compile_lowbit(model, (x,), bits=8, passes=_pipeline(",codegen"))
    op = next(m for m in cm.graph_module.modules() if isinstance(m, FusedAttention))
    assert op.max_query_rows == 1 << 16
    assert ("kernel" in op.backend and "ms" in op.backend), op.backend     # the timed choice, either way
    want = cm.graph_module(x)
    if op.kernel is not None and op.kernel.has_prefill:                    # kernel kept: bf16 rounding only
        op.kernel = None
        ref = cm.graph_module(x)
        assert 0 < float((want - ref).abs().max()) < 0.01 * float(ref.abs().max())
