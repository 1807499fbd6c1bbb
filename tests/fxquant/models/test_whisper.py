"""Whisper architecture: openai parameter names, KV-cache equivalence, torch.export of encoder and step."""
import pytest
import torch

from fxquant.models.whisper import (PRESETS, DecoderCrossCache, DecoderStep, ModelDimensions, Whisper,
                                    greedy_decode, load_whisper, save_whisper, whisper_random)

DIMS = ModelDimensions(n_mels=16, n_audio_ctx=12, n_audio_state=32, n_audio_head=2, n_audio_layer=2,
                       n_vocab=60, n_text_ctx=24, n_text_state=32, n_text_head=4, n_text_layer=2)


@pytest.fixture(scope="module")
def model():
    return whisper_random(DIMS, seed=0, std=0.3)


def test_presets():
    assert PRESETS["tiny"] == ModelDimensions(80, 1500, 384, 6, 4, 51865, 448, 384, 6, 4)
    assert (PRESETS["base"].n_audio_state, PRESETS["base"].n_text_head, PRESETS["base"].n_text_layer) == (512, 8, 6)
    assert (PRESETS["small"].n_audio_state, PRESETS["small"].n_audio_head, PRESETS["small"].n_audio_layer) == (768, 12, 12)
    with torch.device("meta"):
        tiny = Whisper(PRESETS["tiny"])
    assert tiny.encoder.conv1.weight.shape == (384, 80, 3)
    assert tiny.decoder.token_embedding.weight.shape == (51865, 384)
    assert 37_000_000 < sum(p.numel() for p in tiny.parameters()) < 38_000_000


def test_openai_parameter_names(model):
    keys = set(model.state_dict())
    for name in ["encoder.conv1.weight", "encoder.conv2.bias", "encoder.positional_embedding",
                 "encoder.blocks.1.attn.query.bias", "encoder.blocks.0.attn.key.weight", "encoder.blocks.0.attn.out.weight",
                 "encoder.blocks.0.attn_ln.weight", "encoder.blocks.0.mlp.0.weight", "encoder.blocks.0.mlp.2.bias",
                 "encoder.blocks.0.mlp_ln.bias", "encoder.ln_post.weight", "decoder.token_embedding.weight",
                 "decoder.positional_embedding", "decoder.blocks.1.cross_attn.value.weight",
                 "decoder.blocks.1.cross_attn_ln.weight", "decoder.ln.bias"]:
        assert name in keys, name
    assert not any(k.endswith("key.bias") for k in keys)
    assert "decoder.mask" not in keys
    params = dict(model.named_parameters())
    assert "encoder.positional_embedding" not in params and "decoder.positional_embedding" in params


def test_step_logits_equal_full_recompute(model):
    mel = torch.randn(1, 16, 24)
    audio = model.encoder(mel)
    assert audio.shape == (1, 12, 32)
    tokens = torch.tensor([[1, 5, 7, 9, 11, 3]])
    full = model.decoder(tokens, audio)
    cross, cache = model.decoder.cross_cache(audio), model.decoder.empty_cache(1)
    first, cache = model.decoder.step(tokens[:, :4], cross, cache, 0)
    second, cache = model.decoder.step(tokens[:, 4:], cross, cache, torch.tensor(4))
    assert torch.allclose(torch.cat([first, second], 1), full, atol=1e-5)
    assert cache.shape == (1, 2, 2, 4, 24, 8) and cache[..., 6:, :].abs().max() == 0   # (B, layer, k/v, H, T, dh)


def _reference_decoder(model, tokens, audio):
    """Explicit matmul/softmax decoder (the pre-SDPA implementation), for numerics."""
    def attend(q, k, v, n_head, mask):
        b, tq, d = q.shape
        q, k, v = (t.reshape(b, t.shape[1], n_head, d // n_head).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) * (d // n_head) ** -0.5
        if mask is not None:
            scores = scores + mask
        return (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, tq, d)

    def mha(m, x, src, mask=None):
        return m.out(attend(m.query(x), m.key(src), m.value(src), m.n_head, mask))

    dec, n = model.decoder, tokens.shape[-1]
    x = dec.token_embedding(tokens) + dec.positional_embedding[:n]
    for b in dec.blocks:
        x = x + mha(b.attn, b.attn_ln(x), b.attn_ln(x), dec.mask[:n, :n])
        x = x + mha(b.cross_attn, b.cross_attn_ln(x), audio)
        x = x + b.mlp(b.mlp_ln(x))
    return dec._logits(x)


def test_sdpa_matches_explicit_attention_and_cache_layout(model):
    torch.manual_seed(0)
    audio = model.encoder(torch.randn(2, 16, 24))
    tokens = torch.randint(0, DIMS.n_vocab, (2, 9))
    ref = _reference_decoder(model, tokens, audio)
    assert torch.allclose(model.decoder(tokens, audio), ref, atol=1e-4)
    cross = model.decoder.cross_cache(audio)
    assert cross.shape == (2, 2, 2, 4, 12, 8) and cross.is_contiguous()
    k0 = model.decoder.blocks[1].cross_attn.key(audio)
    assert torch.equal(cross[:, 1, 0], k0.view(2, 12, 4, 8).transpose(1, 2))   # (B, layer, k/v, H, A, dh)
    # stale entries at positions >= offset are ignored; the step writes its slots in place
    cache = torch.randn(2, 2, 2, 4, 24, 8)
    before = cache.clone()
    logits, cache2 = model.decoder.step(tokens[:, :5], cross, cache, 0)
    assert cache2 is cache and not torch.equal(cache[..., :5, :], before[..., :5, :])
    assert torch.equal(cache[..., 5:, :], before[..., 5:, :])
    outs = [logits]
    for pos in range(5, 9):
        logits, cache2 = model.decoder.step(tokens[:, pos:pos + 1], cross, cache2, torch.tensor(pos))
        outs.append(logits)
    assert torch.allclose(torch.cat(outs, 1), ref, atol=1e-4)
    assert torch.equal(cache2[..., 9:, :], before[..., 9:, :])


def test_kv_cached_greedy_equals_recompute(model):
    for seed in range(3):
        mel = torch.randn(16, 24, generator=torch.Generator().manual_seed(seed))
        cached = greedy_decode(model, mel, [1, 3], max_tokens=15, eot=2)
        plain = greedy_decode(model, mel, [1, 3], max_tokens=15, eot=2, use_cache=False)
        assert cached == plain and len(cached) >= 1
    long = greedy_decode(model, torch.randn(16, 24), [1, 3], max_tokens=100, eot=-1)
    assert len(long) == DIMS.n_text_ctx - 2      # stops when the text context is full


def test_export_encoder_and_decoder_step(model):
    mel = torch.randn(1, 16, 24)
    enc = torch.export.export(model.encoder, (mel,)).module()
    audio = model.encoder(mel)
    assert torch.allclose(enc(mel), audio, atol=1e-6)
    cross = torch.export.export(DecoderCrossCache(model.decoder), (audio,)).module()
    step = torch.export.export(DecoderStep(model.decoder),
                               (torch.tensor([[1]]), cross(audio), model.decoder.empty_cache(1), torch.tensor(0))).module()
    ref = greedy_decode(model, mel, [1], max_tokens=10, eot=2)
    swapped = greedy_decode(model, mel, [1], max_tokens=10, eot=2, encoder=enc, cross_cache=cross, step=step)
    assert swapped == ref and len(ref) >= 1


def test_save_load_roundtrip(model, tmp_path):
    save_whisper(model, tmp_path / "w.pt")
    loaded = load_whisper(tmp_path / "w.pt")
    assert loaded.dims == DIMS and not loaded.training
    tokens, mel = torch.tensor([[1, 4]]), torch.randn(1, 16, 24)
    assert torch.equal(loaded(mel, tokens), model(mel, tokens))


def test_errors(model, tmp_path):
    with pytest.raises(ValueError, match="encoder expects mel"):
        model.encoder(torch.randn(1, 16, 30))
    with pytest.raises(ValueError, match="unknown Whisper preset"):
        whisper_random("huge")
    with pytest.raises(FileNotFoundError):
        load_whisper(tmp_path / "none.pt")
    torch.save({"weights": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="openai-whisper checkpoint"):
        load_whisper(tmp_path / "bad.pt")
