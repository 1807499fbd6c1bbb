"""Whisper-architecture encoder/decoder with openai-whisper parameter names and an explicit KV cache.

The decoder has two entry points: `decoder(tokens, audio_features)` recomputes everything (the
openai-whisper forward), and `decoder.step(tokens, cross_kv, self_kv, offset)` is one cached decode
step on fixed-size cache tensors (no data-dependent shapes, so torch.export captures it; see
`DecoderStep`). `greedy_decode` keeps the loop in Python and calls the submodules, which can be
swapped for compiled versions.

Example:
    >>> model = whisper_random(ModelDimensions(16, 8, 32, 2, 2, 50, 12, 32, 2, 2), seed=0)
    >>> tokens = greedy_decode(model, torch.randn(16, 16), prompt_tokens=[1], max_tokens=5, eot=2)
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelDimensions", "PRESETS", "Whisper", "AudioEncoder", "TextDecoder", "DecoderStep",
           "DecoderCrossCache", "load_whisper", "save_whisper", "whisper_random", "greedy_decode", "sinusoids"]


@dataclasses.dataclass(frozen=True)
class ModelDimensions:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


PRESETS = {
    "tiny": ModelDimensions(80, 1500, 384, 6, 4, 51865, 448, 384, 6, 4),
    "base": ModelDimensions(80, 1500, 512, 8, 6, 51865, 448, 512, 8, 6),
    "small": ModelDimensions(80, 1500, 768, 12, 12, 51865, 448, 768, 12, 12),
}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Fixed sin/cos position table (length, channels): first half sines, second half cosines."""
    if channels % 2:
        raise ValueError(f"sinusoid channels must be even, got {channels}")
    step = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-step * torch.arange(channels // 2, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, D) -> (B, H, T, D/H) view (no copy)."""
    b, t, d = x.shape
    return x.view(b, t, n_head, d // n_head).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, dh) -> (B, T, H*dh)."""
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention over heads: (B, Tq, D), (B, Tk, D) -> (B, Tq, D).

    Uses the fused CPU kernel (`F.scaled_dot_product_attention`, scale 1/sqrt(D/H)); `mask` is additive
    (broadcast to (Tq, Tk)).
    """
    out = F.scaled_dot_product_attention(_heads(q, n_head), _heads(k, n_head), _heads(v, n_head), attn_mask=mask)
    return _merge_heads(out)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor, xa: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        src = x if xa is None else xa
        return self.out(_attend(self.query(x), self.key(src), self.value(src), self.n_head, mask))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x, xa=None, mask=None):
        x = x + self.attn(self.attn_ln(x), mask=mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), xa)
        return x + self.mlp(self.mlp_ln(x))

    def cached(self, x, mask, self_kv, positions, cross_k, cross_v):
        """One step on head-major caches; writes this step's keys/values into `self_kv` in place.

        `self_kv` is this layer's (B, 2, H, n_ctx, dh) cache; positions (L,) are the steps' slots, and
        `mask` the additive (L, n_ctx) mask (-inf on slots a query must not see). Attention reads the
        whole cache through the mask, so the cache is never copied or concatenated.
        """
        h = self.attn_ln(x)
        n_head = self.attn.n_head
        q = _heads(self.attn.query(h), n_head)
        self_kv.index_copy_(3, positions, torch.stack([_heads(self.attn.key(h), n_head),
                                                       _heads(self.attn.value(h), n_head)], dim=1))
        att = F.scaled_dot_product_attention(q, self_kv[:, 0], self_kv[:, 1], attn_mask=mask)
        x = x + self.attn.out(_merge_heads(att))
        h = self.cross_attn_ln(x)
        q = _heads(self.cross_attn.query(h), self.cross_attn.n_head)
        x = x + self.cross_attn.out(_merge_heads(F.scaled_dot_product_attention(q, cross_k, cross_v)))
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """(B, n_mels, 2*n_ctx) log-mel -> (B, n_ctx, n_state) audio features."""

    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, 3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, 3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer))
        self.ln_post = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_ctx = self.positional_embedding.shape[0]
        if x.dim() != 3 or x.shape[1] != self.conv1.in_channels or x.shape[2] != 2 * n_ctx:
            raise ValueError(f"encoder expects mel (B, {self.conv1.in_channels}, {2 * n_ctx}), got {tuple(x.shape)}")
        x = F.gelu(self.conv2(F.gelu(self.conv1(x)))).transpose(1, 2)
        x = x + self.positional_embedding.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    """Token decoder; logits use the token embedding as output projection (tied)."""

    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer))
        self.ln = nn.LayerNorm(n_state)
        self.register_buffer("mask", torch.full((n_ctx, n_ctx), float("-inf")).triu_(1), persistent=False)
        self.register_buffer("slots", torch.arange(n_ctx), persistent=False)  # cache slot numbers

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.token_embedding, "project"):     # a table held as row blocks (models.token_blocks)
            return self.token_embedding.project(self.ln(x)).float()
        return torch.matmul(self.ln(x), self.token_embedding.weight.to(x.dtype).t()).float()

    def forward(self, tokens: torch.Tensor, audio_features: torch.Tensor) -> torch.Tensor:
        """Full recompute: (B, L) tokens, (B, A, D) audio -> (B, L, n_vocab) logits."""
        n = tokens.shape[-1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        for block in self.blocks:
            x = block(x, audio_features, mask=self.mask[:n, :n])
        return self._logits(x)

    def cross_cache(self, audio_features: torch.Tensor) -> torch.Tensor:
        """Cross-attention keys/values of all layers, batch-first and head-major: (B, n_layer, 2, H, A, D/H).

        Computed once per utterance so that every `step` reads them without reshaping or copying
        (batch first, so that a compiled step keeps the batch size dynamic).
        """
        return torch.stack([torch.stack([_heads(b.cross_attn.key(audio_features), b.cross_attn.n_head),
                                         _heads(b.cross_attn.value(audio_features), b.cross_attn.n_head)], dim=1)
                            for b in self.blocks], dim=1)

    def empty_cache(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Zeroed self-attention cache, batch-first and head-major: (B, n_layer, 2, H, n_text_ctx, D/H)."""
        return torch.zeros(batch, *cache_geometry(self), dtype=dtype)

    def step(self, tokens: torch.Tensor, cross_kv: torch.Tensor, self_kv: torch.Tensor, offset):
        """Cached step: `tokens` (B, L) sit at positions offset..offset+L-1.

        `cross_kv` comes from `cross_cache` (B, n_layer, 2, H, A, D/H) and `self_kv` from `empty_cache` or
        a previous step (B, n_layer, 2, H, n_text_ctx, D/H); entries at positions >= offset are ignored.
        The step writes its keys/values into `self_kv` in place (one `index_copy_` per layer, as a static
        KV cache does) and returns ((B, L, n_vocab) logits, self_kv). `offset` is an int or a 0-dim
        int64 tensor.
        """
        offset = offset if isinstance(offset, torch.Tensor) else torch.tensor(offset, dtype=torch.long)
        positions = offset + torch.arange(tokens.shape[-1], dtype=torch.long)
        # query i sees cache slots 0..positions[i]: the old cache and this step's earlier-or-same tokens
        mask = torch.where(self.slots <= positions[:, None], 0.0, float("-inf")).to(cross_kv.dtype)
        x = self.token_embedding(tokens) + self.positional_embedding.index_select(0, positions)
        for i, block in enumerate(self.blocks):
            x = block.cached(x, mask, self_kv[:, i], positions, cross_kv[:, i, 0], cross_kv[:, i, 1])
        return self._logits(x), self_kv


def cache_geometry(decoder: "TextDecoder") -> tuple[int, int, int, int, int]:
    """Self-attention cache shape after the batch: (n_layer, 2, H, n_text_ctx, D/H)."""
    n_ctx, d = decoder.positional_embedding.shape
    n_head = decoder.blocks[0].attn.n_head
    return len(decoder.blocks), 2, n_head, n_ctx, d // n_head


class DecoderStep(nn.Module):
    """Module whose forward is `decoder.step` (shares its parameters), for torch.export."""

    def __init__(self, decoder: TextDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens, cross_kv, self_kv, offset):
        return self.decoder.step(tokens, cross_kv, self_kv, offset)


class DecoderCrossCache(nn.Module):
    """Module whose forward is `decoder.cross_cache`, for torch.export."""

    def __init__(self, decoder: TextDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, audio_features):
        return self.decoder.cross_cache(audio_features)


class Whisper(nn.Module):
    """Encoder + decoder; forward(mel, tokens) -> logits (full recompute)."""

    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                                    dims.n_audio_layer)
        self.decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head,
                                   dims.n_text_layer)

    def forward(self, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens, self.encoder(mel))


def _dims(value) -> ModelDimensions:
    if isinstance(value, ModelDimensions):
        return value
    if isinstance(value, str):
        if value not in PRESETS:
            raise ValueError(f"unknown Whisper preset {value!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[value]
    if isinstance(value, dict):
        return ModelDimensions(**value)
    raise ValueError(f"expected a preset name, dict or ModelDimensions, got {type(value).__name__}")


def load_whisper(path) -> Whisper:
    """Load an openai-whisper checkpoint ({"dims", "model_state_dict"}) into fp32, eval mode.

    Example:
        >>> model = load_whisper("tiny.pt")     # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Whisper checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ValueError(f"{path}: not an openai-whisper checkpoint (need keys 'dims' and 'model_state_dict')")
    model = Whisper(_dims(ckpt["dims"]))
    model.load_state_dict(ckpt["model_state_dict"], strict=True)
    return model.float().eval()


def save_whisper(model: Whisper, path) -> None:
    """Write `model` in the openai-whisper checkpoint layout (used by tests for `load_whisper`)."""
    torch.save({"dims": dataclasses.asdict(model.dims), "model_state_dict": model.state_dict()}, path)


def whisper_random(preset="tiny", seed: int = 0, std: float = 0.1) -> Whisper:
    """Randomly initialised Whisper (preset name, dict or ModelDimensions), deterministic in `seed`.

    Example:
        >>> whisper_random(ModelDimensions(16, 8, 32, 2, 1, 50, 12, 32, 2, 1)).dims.n_vocab
        50
    """
    gen = torch.Generator().manual_seed(seed)
    model = Whisper(_dims(preset))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_ln." in name or "ln_post." in name or name.startswith("decoder.ln."):
                if name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


@torch.no_grad()
def greedy_decode(model: Whisper, mel: torch.Tensor, prompt_tokens: Sequence[int], max_tokens: int, eot: int,
                  *, use_cache: bool = True, encoder=None, cross_cache=None, step=None) -> list[int]:
    """Greedy decoding of one utterance; returns the generated ids after the prompt (eot excluded).

    `mel` is (n_mels, frames) or (1, n_mels, frames). Stops at `eot`, after `max_tokens`, or when
    the text context is full. `encoder`, `cross_cache` and `step` override `model.encoder`,
    `model.decoder.cross_cache` and `model.decoder.step` (e.g. with compiled modules); with
    use_cache=False every step recomputes `model.decoder(tokens, audio)` (the reference).

    Example:
        >>> greedy_decode(model, mel, [50258], 20, eot=50257)   # doctest: +SKIP
    """
    if mel.dim() == 2:
        mel = mel[None]
    if mel.dim() != 3 or mel.shape[0] != 1:
        raise ValueError(f"greedy_decode decodes one utterance: mel (n_mels, T) or (1, n_mels, T), got {tuple(mel.shape)}")
    prompt = list(prompt_tokens)
    n_ctx = model.dims.n_text_ctx
    if not 0 < len(prompt) < n_ctx:
        raise ValueError(f"prompt needs 1..{n_ctx - 1} tokens, got {len(prompt)}")
    audio = (encoder or model.encoder)(mel)
    out: list[int] = []
    if use_cache:
        step = step or model.decoder.step
        cross = (cross_cache or model.decoder.cross_cache)(audio)
        cache = model.decoder.empty_cache(1, audio.dtype)
        logits, cache = step(torch.tensor([prompt]), cross, cache, torch.tensor(0))
    else:
        logits = model.decoder(torch.tensor([prompt]), audio)
    while len(out) < max_tokens:
        nxt = int(logits[0, -1].argmax())
        if nxt == eot:
            break
        out.append(nxt)
        pos = len(prompt) + len(out) - 1            # position of the token just produced
        if pos >= n_ctx - 1 or len(out) >= max_tokens:
            break
        if use_cache:
            logits, cache = step(torch.tensor([[nxt]]), cross, cache, torch.tensor(pos))
        else:
            logits = model.decoder(torch.tensor([prompt + out]), audio)
    return out
