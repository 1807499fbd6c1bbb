"""Shared fixtures: seeded RNG, the ../shared locator, small models used by several tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """../shared beside the repo (or $FXQUANT_SHARED); None when absent."""
    path = Path(os.environ.get("FXQUANT_SHARED", REPO.parent / "shared"))
    return path if path.is_dir() else None


# Real checkpoints on real recordings, end to end (10-50 s each on 2 busy cores): the `slow` tier, which CI
# runs (`python -m pytest -q`) and `-m "not slow"` skips. Listed here rather than in their files while the
# ASR / model work streams edit those files; each can move to a @pytest.mark.slow in its file.
SLOW_REAL_DATA = {
    "tests/fxquant/asr/test_evaluation.py::test_two_real_clips",
    "tests/fxquant/asr/test_transcriber.py::test_long_audio_is_cut_into_windows",
    "tests/fxquant/asr/test_transcriber.py::test_fallback_retries_unlikely_windows",
    "tests/fxquant/asr/test_cli.py::test_transcribe_tsv_and_json",
    "tests/fxquant/asr/test_decoding.py::test_real_tiny_en_transcribes_lj_speech",
    "tests/fxquant/models/test_digits.py::test_wer_on_test_strings",
    "tests/fxquant/models/test_whisper_ct2.py::test_tiny_en_greedy_tokens_match_ctranslate2",
    "tests/fxquant/models/test_bcresnet.py::test_accuracy_on_fsdd_test_split",
    "tests/fxquant/models/test_bcresnet.py::test_feature_cache_file",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark SLOW_REAL_DATA slow before `-m "not slow"` deselects by marker."""
    for item in items:
        if item.nodeid.split("[")[0] in SLOW_REAL_DATA:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared() -> Path:
    path = shared_dir()
    if path is None:
        pytest.skip("../shared (data and pretrained weights) is not present beside the repository")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of many small ops (fast and predictable on a shared machine).

    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
