"""The index that finds a cached compiled Whisper without loading its checkpoint."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fxquant.asr import cache_index
from fxquant.asr.cache_index import index_key, lookup, remember


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "whisper").mkdir(parents=True)
    return tmp_path / "cache" / "whisper"


@pytest.fixture
def ckpt_dir(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.bin").write_bytes(b"\0" * 100)
    (d / "config.json").write_text("{}")
    return d


def _artifact(cache, name):
    (cache / name).mkdir()
    (cache / name / "whisper.json").write_text("{}")
    return cache / name


def test_key_follows_the_checkpoint_files_and_the_precision(cache, ckpt_dir):
    key = index_key(str(ckpt_dir), "avg4")
    assert key == index_key(str(ckpt_dir), "avg4") and len(key) == 32
    assert index_key(str(ckpt_dir), "bits8") != key
    (ckpt_dir / "model.bin").write_bytes(b"\1" * 101)                     # new weights: another key
    changed = index_key(str(ckpt_dir), "avg4")
    assert changed != key
    st = (ckpt_dir / "model.bin").stat()
    os.utime(ckpt_dir / "model.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # touched: another key
    assert index_key(str(ckpt_dir), "avg4") != changed
    assert index_key(str(ckpt_dir / "missing"), "avg4") is None
    assert index_key(torch.nn.Linear(2, 2), "avg4") is None


def test_remember_and_lookup(cache, ckpt_dir):
    key = index_key(str(ckpt_dir), "avg4")
    assert lookup(key) is None
    folder = _artifact(cache, "m-avg4-0123")
    remember(key, folder)
    assert lookup(key) == folder
    (folder / "whisper.json").unlink()                          # the artifact is gone: a miss
    assert lookup(key) is None
    assert lookup(None) is None


def test_index_refuses_folders_elsewhere_and_survives_a_corrupt_file(cache, ckpt_dir, tmp_path):
    key = index_key(str(ckpt_dir), "avg4")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "whisper.json").write_text("{}")
    remember(key, outside)
    assert lookup(key) is None
    (cache / "index.json").write_text(json.dumps({key: "../elsewhere"}))
    assert lookup(key) is None
    (cache / "index.json").write_text("{not json")
    assert lookup(key) is None
    folder = _artifact(cache, "m-avg4-4567")
    remember(key, folder)
    assert json.loads((cache / "index.json").read_text()) == {key: "m-avg4-4567"}


def test_index_keeps_the_latest_entries(cache, ckpt_dir, monkeypatch):
    monkeypatch.setattr(cache_index, "MAX_ENTRIES", 3)
    folder = _artifact(cache, "m")
    for p in range(5):
        remember(index_key(str(ckpt_dir), f"bits{p}"), folder)
    kept = json.loads((cache / "index.json").read_text())
    assert list(kept) == [index_key(str(ckpt_dir), f"bits{p}") for p in (2, 3, 4)]


@pytest.mark.slow
def test_second_load_skips_the_checkpoint(small_ckpt, tmp_path, monkeypatch, cache):
    """The first call compiles (checkpoint loaded) and records the folder; the second finds it by the index
    and never loads the checkpoint."""
    import fxquant.asr.compiled as compiled
    import fxquant.models.whisper_ckpt as ckpt_mod
    from fxquant.asr import load_transcriber

    g = torch.Generator().manual_seed(0)
    waves = [torch.randn(16000 * 3, generator=g) * 0.1 for _ in range(2)]
    real = compiled.compile_whisper
    monkeypatch.setattr(compiled, "compile_whisper", lambda ck, **kw: real(ck, calibration_waves=waves, **kw))
    monkeypatch.setattr(ckpt_mod, "load_checkpoint", lambda name: small_ckpt)
    logs: list[str] = []
    first = load_transcriber(str(small_ckpt.directory), bits=8, log=logs.append)
    assert any(m.startswith("compiling") for m in logs)

    def no_checkpoint(name):
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr(ckpt_mod, "load_checkpoint", no_checkpoint)
    logs.clear()
    second = load_transcriber(str(small_ckpt.directory), bits=8, log=logs.append)
    assert [m.split(" from ")[0] for m in logs] == ["loaded compiled small-random (bits8)"]
    mel = torch.randn(1, 80, 3000, generator=g) * 0.5
    assert torch.equal(second.parts.encoder(mel), first.parts.encoder(mel))
