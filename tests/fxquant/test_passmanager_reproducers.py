"""Reproducers of a failed pass go to a fresh folder: a private mkdtemp one, or a new name in the dump dir.

They never replace or delete a folder that exists (issue 13: a fixed $TMPDIR/reproducer-NN-pass
path was deleted and rewritten by every failure, whoever owned it).
"""
from __future__ import annotations

import re
import stat
import tempfile
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant.registry import register_pass, unregister_pass
from fxquant.zoo import KeywordCNN

X = torch.randn(1, 1, 10, 10)


@pytest.fixture
def failing_pass():
    @register_pass("fail-repro-test", kind="transform")
    def fail(gm, ctx):
        raise RuntimeError("boom")

    yield "fail-repro-test"
    unregister_pass("fail-repro-test")


def _reproducer(exc: BaseException) -> Path:
    return Path(re.search(r"reproducer \(graph before the pass \+ pipeline text\): (\S+)", str(exc)).group(1))


def test_without_a_dump_dir_each_failure_gets_a_private_temp_folder(failing_pass, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    squatter = tmp_path / "reproducer-01-fail-repro-test"
    squatter.mkdir()
    (squatter / "keep.txt").write_text("someone else's")
    paths = []
    for _ in range(2):
        with pytest.raises(fxquant.PassFailure) as info:
            fxquant.compile_lowbit(KeywordCNN().eval(), (X,), passes=failing_pass)
        paths.append(_reproducer(info.value))
    assert paths[0] != paths[1] and all(p.parent == tmp_path for p in paths)
    assert all(p.name.startswith("fxquant-reproducer-01-fail-repro-test-") for p in paths)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in paths)  # mkdtemp: private to this user
    assert (squatter / "keep.txt").read_text() == "someone else's"
    assert (paths[0] / "failing_pipeline.txt").read_text() == "fail-repro-test\n"


def test_in_a_dump_dir_an_existing_reproducer_is_kept(failing_pass, tmp_path):
    old = tmp_path / "reproducer-01-fail-repro-test"
    old.mkdir()
    (old / "notes.txt").write_text("my analysis")
    with pytest.raises(fxquant.PassFailure) as info:
        fxquant.compile_lowbit(KeywordCNN().eval(), (X,), passes=failing_pass, dump_dir=tmp_path)
    new = _reproducer(info.value)
    assert new == tmp_path / "reproducer-01-fail-repro-test-2"
    assert (old / "notes.txt").read_text() == "my analysis"
    assert "boom" in (new / "error.txt").read_text()
