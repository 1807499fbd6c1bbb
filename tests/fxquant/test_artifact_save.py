"""save(): never deletes what is not an artifact, replaces one atomically, writes at disk speed; load()
checks its inputs like a compiled module and reuses cached kernels; submodule compiles save too."""
from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import fxquant
from fxquant import artifact_files
from fxquant.codegen import build
from fxquant.errors import InputError

X = torch.randn(2, 64)


def _model(width: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 8)).eval()


@pytest.fixture(scope="module")
def compiled():
    return fxquant.compile_lowbit(_model(), (X,), bits=4, target="reference")


def test_a_folder_that_is_not_an_artifact_is_never_replaced(compiled, tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    with pytest.raises(fxquant.ArtifactError, match="not an fxquant artifact .*'chapter1.tex'.*refusing"):
        compiled.save(precious)
    assert (precious / "chapter1.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]  # no temporary folder left behind


def test_a_fake_manifest_does_not_make_a_folder_an_artifact(compiled, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(fxquant.ArtifactError, match="refusing to replace"):
        compiled.save(folder)
    assert (folder / "manifest.json").exists()


def test_files_and_symlinks_are_refused_as_destinations(compiled, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(fxquant.ArtifactError, match="is a file"):
        compiled.save(tmp_path / "file")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(fxquant.ArtifactError, match="symbolic link"):
        compiled.save(tmp_path / "link")


def test_an_empty_folder_and_an_old_artifact_are_replaced(compiled, tmp_path):
    (tmp_path / "art").mkdir()
    path = compiled.save(tmp_path / "art")
    first = (path / "manifest.json").read_text()
    other = fxquant.compile_lowbit(_model(32), (X,), bits=8, target="reference")
    other.save(path)
    assert (path / "manifest.json").read_text() != first
    torch.testing.assert_close(fxquant.load(path)(X), other(X), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_without_an_atomic_swap_a_failed_rename_keeps_the_old_artifact(compiled, tmp_path, monkeypatch):
    path = compiled.save(tmp_path / "art")
    monkeypatch.setattr(artifact_files, "_exchange", lambda a, b: False)
    real = artifact_files.os.rename
    calls = []

    def flaky(src, dst):
        calls.append((str(src), str(dst)))
        if len(calls) == 2:  # old moved aside; moving the new one in fails (disk full, kill -9 ...)
            raise OSError("simulated failure")
        return real(src, dst)

    monkeypatch.setattr(artifact_files.os, "rename", flaky)
    with pytest.raises(OSError, match="simulated"):
        fxquant.compile_lowbit(_model(32), (X,), bits=8, target="reference").save(path)
    monkeypatch.setattr(artifact_files.os, "rename", real)
    torch.testing.assert_close(fxquant.load(path)(X), compiled(X), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_tensors_are_written_as_whole_buffers(tmp_path):
    """8 MiB of 4-bit codes and scales: byte-by-byte serialisation took ~20 s here; whole buffers < 2 s."""
    big = nn.Sequential(nn.Linear(4096, 4096)).eval()
    cm = fxquant.compile_lowbit(big, (torch.randn(2, 4096),), bits=4, target="reference", group_size=128)
    start = time.perf_counter()
    path = cm.save(tmp_path / "big")
    seconds = time.perf_counter() - start
    assert (path / "weights.bin").stat().st_size > 8 << 20
    assert seconds < 2.0, f"save took {seconds:.2f} s"
    start = time.perf_counter()
    loaded = fxquant.load(path)
    assert time.perf_counter() - start < 3.0
    x = torch.randn(3, 4096)
    torch.testing.assert_close(loaded(x), cm(x), rtol=0, atol=0)


def test_loading_twice_compiles_nothing_the_cache_holds(tmp_path):
    cm = fxquant.compile_lowbit(_model(), (X,), bits=4)
    path = cm.save(tmp_path / "native")
    fxquant.load(path)
    compiles = build.STATS["compiles"]
    loaded = fxquant.load(path)
    assert build.STATS["compiles"] == compiles
    assert all(r["backend"].startswith("c:") for r in loaded.report_rows())


def test_a_loaded_artifact_checks_its_inputs(compiled, tmp_path):
    loaded = fxquant.load(compiled.save(tmp_path / "art"))
    with pytest.raises(InputError, match=r"takes 1 input \(input\), got 2"):
        loaded(X, X)
    with pytest.raises(InputError, match=r"has shape \(2, 63\).*\(any, 64\)"):
        loaded(torch.randn(2, 63))
    with pytest.raises(InputError, match="device meta"):
        loaded(torch.empty(2, 64, device="meta"))
    with pytest.raises(InputError, match="floating point"):
        loaded(torch.ones(2, 64, dtype=torch.int64))
    assert loaded(torch.randn(5, 64)).shape == (5, 8)  # the batch stays dynamic, as compiled


class TwoStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.encoder(x)
        for _ in range(int(h.abs().sum() > 0) + 1):  # the model's own Python stays outside the artifact
            h = h * 0.5
        return self.head(h)


def test_submodule_compiles_save_and_load_around_the_float_model(tmp_path):
    model = TwoStage().eval()
    x = torch.randn(3, 16)
    cs = fxquant.compile_lowbit(model, (x,), bits=8, target="reference", submodules=["encoder", "head"])
    path = cs.save(tmp_path / "parts")
    assert sorted(p.name for p in (path / "parts").iterdir()) == ["encoder", "head"]
    with pytest.raises(fxquant.ArtifactError, match="pass the float model"):
        fxquant.load(path)
    loaded = fxquant.load(path, model=TwoStage().eval())
    assert sorted(loaded.compiled) == ["encoder", "head"]
    torch.testing.assert_close(loaded(x), cs(x), rtol=0, atol=0)
    with pytest.raises(fxquant.ArtifactError, match="no submodule 'encoder'"):
        fxquant.load(path, model=nn.Sequential(nn.Linear(16, 4)))
