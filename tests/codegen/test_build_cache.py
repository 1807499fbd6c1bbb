"""The kernel cache trusts a library only when its bytes match the sha256 recorded at build time."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fxquant.codegen import BuildError, build, compile_op

from .codegen_cases import make_linear

SOURCE = "int fx_answer(void) { return 42; }\n"
OTHER = "int fx_answer(void) { return 7; }\n"
FLAGS = ("-O1", "-fPIC", "-shared")


def _build(tmp_path: Path, source: str = SOURCE, name: str = "demo") -> Path:
    return build.compile_source(source, name, FLAGS, str(tmp_path))


def test_a_build_records_the_library_hash(tmp_path):
    lib = _build(tmp_path)
    sidecar = lib.with_name(lib.name + ".sha256")
    assert sidecar.read_text().split() == [build._file_sha256(lib), lib.name]
    assert build.verified(lib)
    hits = build.STATS["cache_hits"]
    assert _build(tmp_path) == lib and build.STATS["cache_hits"] == hits + 1


@pytest.mark.parametrize("damage", ["replaced", "truncated", "emptied", "no_sidecar"])
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, damage):
    lib = _build(tmp_path)
    good = lib.read_bytes()
    if damage == "replaced":  # another valid kernel under this key: it would load silently and corrupt memory
        other = _build(tmp_path / "other", OTHER)
        lib.write_bytes(other.read_bytes())
    elif damage == "truncated":
        lib.write_bytes(good[: len(good) // 3])
    elif damage == "emptied":
        lib.write_bytes(b"")
    else:
        lib.with_name(lib.name + ".sha256").unlink()
    compiles, rebuilt = build.STATS["compiles"], build.STATS["rebuilt"]
    assert _build(tmp_path) == lib
    assert build.STATS["compiles"] == compiles + 1 and build.STATS["rebuilt"] == rebuilt + 1
    assert build.verified(lib) and lib.read_bytes() == good


def test_builds_of_one_key_wait_for_the_one_running(tmp_path, monkeypatch):
    """Another process compiles a source (its compiler blocks until released) while three threads here ask for
    the same library: they wait for it and load its result; the compiler runs once, no lock file is left."""
    runs, go, cache = tmp_path / "runs", tmp_path / "go", tmp_path / "cache"
    cc = tmp_path / "gated-cc"  # logs each compile, then waits for `go`
    cc.write_text(f'#!/bin/sh\ncase " $* " in *" -o "*) echo run >> "{runs}"; '
                  f'while [ ! -e "{go}" ]; do sleep 0.05; done;; esac\nexec "{build.find_compiler()}" "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    code = ("from fxquant.codegen import build; "
            f"print(build.compile_source({SOURCE!r}, 'demo', {FLAGS!r}, {str(cache)!r}))")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not runs.exists():  # the other process holds the key's lock from before its compiler starts
            assert other.poll() is None and time.monotonic() < deadline, "the other process did not compile"
            time.sleep(0.05)
        compiles, hits = build.STATS["compiles"], build.STATS["cache_hits"]
        with ThreadPoolExecutor(3) as pool:
            waiting = [pool.submit(build.compile_source, SOURCE, "demo", FLAGS, str(cache)) for _ in range(3)]
            threading.Timer(0.3, go.touch).start()
            libs = {f.result(timeout=60) for f in waiting}
    finally:
        go.touch()
        out, _ = other.communicate(timeout=60)
    assert other.returncode == 0 and libs == {Path(out.strip())}
    assert runs.read_text().splitlines() == ["run"] and build.verified(Path(out.strip()))
    assert build.STATS["compiles"] == compiles and build.STATS["cache_hits"] == hits + 3
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_a_compiler_that_writes_nothing_is_an_error_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "/bin/true")
    with pytest.raises(BuildError, match="wrote no shared library"):
        _build(tmp_path)
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.sha256"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", ["32/../../x", "../escape", "a b", "x;rm", ""])
def test_kernel_names_cannot_leave_the_cache(tmp_path, name):
    cache = tmp_path / "cache"
    with pytest.raises(BuildError, match="letters, digits or _"):
        build.compile_source(SOURCE, name, FLAGS, str(cache))
    assert not list(tmp_path.rglob("*.c"))


def test_a_rebuilt_kernel_computes_like_the_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    op = make_linear(16, 64, 4, 32, "sym", True, "relu", 8)
    compile_op(op, "portable")
    (lib,) = tmp_path.glob("linear_*.so")
    truncated = tmp_path / "truncated"
    truncated.write_bytes(lib.read_bytes()[:100])
    os.replace(truncated, lib)  # a new file: the loaded library's mapping stays intact
    build._LOADED.pop(str(lib), None)
    kernel = compile_op(op, "portable")
    assert build.verified(lib) and os.path.getsize(lib) > 1000
    x = torch.randn(3, 64)
    torch.testing.assert_close(kernel(x), op.reference(x), rtol=1e-5, atol=1e-5)


def test_a_missing_compiler_is_a_user_facing_error(tmp_path, monkeypatch):
    """BuildError is an FxQuantError: the CLI prints it and exits with code 2 instead of a traceback."""
    from fxquant.cli import main
    from fxquant.errors import FxQuantError

    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    assert issubclass(BuildError, FxQuantError) and issubclass(BuildError, RuntimeError)
    assert main(["compile", "kws-cnn", "--bits", "4", "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
