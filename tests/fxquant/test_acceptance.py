"""Acceptance: real speech architectures capture, fold and compile with the default pipeline.

Tolerances: after the hygiene passes (cleanup, fold-bn, const-fold, propagate-shapes) outputs match
eager within rtol 1e-4 / atol 1e-4 (BatchNorm folding re-rounds fp32 weights); after the default
W8A8 pipeline the output SQNR against eager is above 25 dB.
"""
from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.models.whisper import DecoderStep, ModelDimensions, whisper_random
from fxquant.zoo import KeywordCNN

from .acceptance_models import ConformerBlock, LSTMRecognizer, randomize_batchnorm

HYGIENE = "cleanup,fold-bn,const-fold,propagate-shapes"
DIMS = ModelDimensions(n_mels=16, n_audio_ctx=24, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                       n_vocab=97, n_text_ctx=16, n_text_state=64, n_text_head=4, n_text_layer=2)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp_min(1e-30)))


def _whisper():
    return whisper_random(DIMS, seed=0, std=0.05)


def cases():
    w = _whisper()
    audio = w.encoder(torch.randn(1, 16, 48))
    tokens = torch.randint(0, 97, (1, 5))
    step = DecoderStep(w.decoder).eval()
    return {
        "kws-cnn": (KeywordCNN().eval(), (torch.randn(2, 1, 10, 10),)),
        "conformer-block": (randomize_batchnorm(ConformerBlock()), (torch.randn(2, 20, 64),)),
        "whisper-encoder": (w.encoder, (torch.randn(1, 16, 48),)),
        "whisper-decoder": (w.decoder, (tokens, audio)),
        "whisper-decoder-step": (step, (tokens[:, :1], w.decoder.cross_cache(audio), w.decoder.empty_cache(1),
                                        torch.tensor(3))),
        "lstm-recognizer": (randomize_batchnorm(LSTMRecognizer()), (torch.randn(2, 40, 30),)),
    }


def _flat(out):
    return torch.cat([t.reshape(-1) for t in (out if isinstance(out, tuple) else (out,))])


@pytest.mark.parametrize("name", list(cases()))
def test_hygiene_passes_match_eager(name):
    model, inputs = cases()[name]
    cm = fxquant.compile_lowbit(model, inputs, passes=HYGIENE)
    with torch.no_grad():
        torch.testing.assert_close(_flat(cm(*inputs)), _flat(model(*inputs)), rtol=1e-4, atol=1e-4)
    assert not any(n.target is torch.ops.aten.batch_norm.default for n in cm.graph_module.graph.nodes)


@pytest.mark.parametrize("name", ["kws-cnn", "conformer-block", "whisper-encoder", "whisper-decoder-step",
                                  "lstm-recognizer"])
def test_default_pipeline_w8a8_stays_close(name):
    model, inputs = cases()[name]
    target = "native" if name in ("kws-cnn", "whisper-encoder") else "reference"
    cm = fxquant.compile_lowbit(
        model,
        inputs,
        target=target,  # kernels wanted (never_slower off)
        passes=fxquant.default_pipeline(target).replace(",codegen", ",codegen{never_slower=false}"),
    )
    with torch.no_grad():
        ref, out = _flat(model(*inputs)), _flat(cm(*inputs))
    assert sqnr_db(ref, out) > 25.0
    rows = cm.report_rows()
    assert rows and all(r["format"].startswith("W8") or r["format"] == "float" for r in rows)
    if target == "native":
        assert {r["backend"] for r in rows if r["format"] != "float"} == {
            f"c:{fxquant.codegen.detect_host().name}"
        }


def test_bcresnet_from_shared_weights(shared):
    from fxquant.models.bcresnet import load_bcresnet

    model = load_bcresnet()  # strict=True load of ../shared/models/bcresnet/model-sc-2.pt
    x = torch.randn(4, 1, 40, 32)
    cm = fxquant.compile_lowbit(model, (x,), passes=HYGIENE)
    torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-4)
    folded = [
        n
        for n in cm.graph_module.graph.nodes
        if any("fold-bn: folded" in p for p in n.meta.get("fxq_provenance", ()))
    ]
    kept = [n for n in cm.graph_module.graph.nodes if n.target is torch.ops.aten.batch_norm.default]
    assert len(folded) >= 10  # every conv -> BatchNorm pair
    assert kept and all(
        any("not folded" in p for p in n.meta["fxq_provenance"]) for n in kept
    )  # SubSpectralNorm
