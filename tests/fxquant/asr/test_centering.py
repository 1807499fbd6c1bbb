"""The centered token table (compile_whisper(center_table=True)): same token choices and probabilities, caller's
model intact."""
from __future__ import annotations

import torch

from fxquant.asr.compiled import centered_token_table
from fxquant.models.whisper import whisper_random

from .conftest import SMALL


def test_centered_table_keeps_the_distributions_and_the_original_model():
    torch.manual_seed(0)
    model = whisper_random(SMALL, seed=0, std=0.05).eval()
    with torch.no_grad():
        model.decoder.token_embedding.weight += torch.randn(SMALL.n_text_state) * 0.5   # a shared offset, as in tiny.en
    before = model.decoder.token_embedding.weight.clone()
    centered = centered_token_table(model)
    assert torch.equal(model.decoder.token_embedding.weight, before)
    assert centered.decoder.token_embedding.weight.mean(0).abs().max() < 1e-5
    audio = torch.randn(2, SMALL.n_audio_ctx, SMALL.n_audio_state)
    tokens = torch.randint(0, SMALL.n_vocab, (2, 5))
    with torch.no_grad():
        outs = [m.decoder.step(tokens, m.decoder.cross_cache(audio), m.decoder.empty_cache(2), torch.tensor(0))[0]
                for m in (model, centered)]
    a, b = (o.float().log_softmax(-1) for o in outs)
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))
    shift = outs[0] - outs[1]                                        # one constant per position
    assert (shift - shift[..., :1]).abs().max() < 1e-3 and shift.abs().max() > 1e-2

