"""Shared fixtures: seeded RNG, the ../shared locator, small models used by several tests; test order and the
background kernel build.

tests/codegen runs last, and once collection ends a background process compiles the kernels its tests use
(tests/codegen/prebuild.py), so that on an empty kernel cache those compiles overlap the other tests.
FXQUANT_TEST_PREBUILD=0 turns the background build off (each test then compiles what it needs).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fxquant.codegen import threadpool
from tests.codegen.prebuild import Background

REPO = Path(__file__).resolve().parents[1]
CODEGEN = REPO / "tests" / "codegen"
_PREBUILD = pytest.StashKey[Background]()


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


def _in_codegen(item) -> bool:
    return Path(item.path).parent == CODEGEN


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark SLOW_REAL_DATA slow before `-m "not slow"` deselects by marker; move tests/codegen to the end."""
    for item in items:
        if item.nodeid.split("[")[0] in SLOW_REAL_DATA:
            item.add_marker(pytest.mark.slow)
    items[:] = sorted(items, key=_in_codegen)  # stable: the order within each part is kept


def pytest_collection_finish(session):
    """Start the background build of the selected tests/codegen modules' kernels."""
    config = session.config
    modules = list(dict.fromkeys(Path(item.path).stem for item in session.items if _in_codegen(item)))
    if modules and not config.option.collectonly and os.environ.get("FXQUANT_TEST_PREBUILD", "1") != "0":
        config.stash[_PREBUILD] = Background(modules, REPO)


def pytest_sessionfinish(session):
    if _PREBUILD in session.config.stash:
        session.config.stash[_PREBUILD].stop()


def pytest_terminal_summary(terminalreporter, config):
    if _PREBUILD in config.stash:
        terminalreporter.write_line(config.stash[_PREBUILD].summary())


@pytest.fixture(scope="module")
def kernel_prebuild_done(request):
    """Wait for the background kernel build to end (for tests that time kernels: no compilers running)."""
    if _PREBUILD in request.config.stash:
        request.config.stash[_PREBUILD].wait()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# modules whose subject is how kernels and torch share threads: they run at torch's own count
OWN_THREADS = {"test_threadpool"}


@pytest.fixture(autouse=True, scope="module")
def _module_threads(request):
    """Torch runs on one intra-op thread in each module; compiled kernels keep torch's former count.

    Tests are chains of small torch ops, and two OpenMP threads on a busy 2-core machine wait for each other
    at every op: at load ~8, tests/fxquant + tests/passes took 333 s at two threads and 114 s at one (a
    tiny-Whisper decoding test: 39 s against 0.07 s), tests/codegen 84 s and 26 s. In tests/codegen the
    kernels still split their work over the former count (threadpool.kernel_threads, for the thread running
    the tests). OWN_THREADS modules keep everything as it is; each module leaves the count as it found it.
    """
    threads, module = torch.get_num_threads(), Path(request.path)
    if module.stem in OWN_THREADS:
        yield
        return
    torch.set_num_threads(1)
    try:
        if module.parent == CODEGEN:
            with threadpool.kernel_threads(threads):
                yield
        else:
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """Each test leaves torch's intra-op thread count as it found it (ctranslate2's intra_threads=1, for one,
    sets OpenMP's count for the whole process): no test depends on the ones run before it."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


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
