"""Compile generated C sources into shared libraries, cached by content hash, and load them.

The cache key is sha256(source + flags + compiler version); a library whose key is already in the
cache directory (env FXQUANT_CACHE_DIR, default ~/.cache/fxquant) is loaded without running the
compiler.  Every file is written to a temporary name and renamed, so a crash never leaves a
half-written library behind.  Each library has a sidecar `<lib>.sha256` written after it: a cached
library is used only when its bytes match the sidecar, otherwise (truncated, replaced, no sidecar)
it is rebuilt.  A compiler that produces no valid shared object (e.g. CC=/bin/true) is a
BuildError, and nothing is cached.  Builds of one key are serialised by a lock file (flock) beside the
library: threads and processes that ask for a library another one is compiling wait for it and load the
result instead of running the compiler again (so kernels can be built concurrently, e.g. in a background
process while the same kernels are requested).

Example:
    >>> flags = ("-O2", "-fPIC", "-shared")
    >>> lib = build_library("int fx_one(void) { return 1; }", "demo", flags)  # doctest: +SKIP
    >>> lib.fx_one()                                                          # doctest: +SKIP
    1
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock; concurrent builds of a key are only duplicated
    fcntl = None

from fxquant.errors import FxQuantError

_LOCK = threading.Lock()
_NAME = re.compile(r"[A-Za-z0-9_]{1,120}\Z")
_ELF_MAGIC = b"\x7fELF"
_LOADED: dict[str, ctypes.CDLL] = {}
STATS = {"compiles": 0, "cache_hits": 0, "rebuilt": 0}


class BuildError(FxQuantError, RuntimeError):
    """The C compiler is missing or failed; the message says which compiler and what to do.

    An FxQuantError, so the CLI reports it as an error (exit code 2) instead of a traceback."""


def find_compiler() -> str:
    """Path of the C compiler: $CC if set, else the first of cc / gcc / clang on PATH."""
    cc = os.environ.get("CC", "").strip()
    candidates = [cc] if cc else ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name.split()[0])
        if path:
            return path
    looked = f"CC={cc!r}" if cc else "cc, gcc and clang on PATH"
    raise BuildError(
        f"no C compiler found (looked for {looked}). Install gcc (e.g. `apt-get install gcc`), "
        f"set CC to a working C compiler, or use target=\"reference\" to run without kernels."
    )


@lru_cache(maxsize=8)
def compiler_version(cc: str) -> str:
    """First line of `cc --version` (part of the cache key)."""
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        raise BuildError(f"cannot run C compiler {cc!r}: {e}. Set CC to a working compiler.") from e
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else cc


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Directory holding cached libraries: override, else $FXQUANT_CACHE_DIR, else ~/.cache/fxquant."""
    d = Path(override or os.environ.get("FXQUANT_CACHE_DIR") or Path.home() / ".cache" / "fxquant")
    d.mkdir(parents=True, exist_ok=True)
    return d


def source_key(source: str, flags: tuple[str, ...], cc: str) -> str:
    h = hashlib.sha256()
    for part in (source, "\0".join(flags), compiler_version(cc)):
        h.update(part.encode())
        h.update(b"\0\1")
    return h.hexdigest()[:20]


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temp file in the same directory, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sidecar(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verified(lib: Path) -> bool:
    """True when `lib` exists and its bytes match the sha256 recorded beside it at build time."""
    try:
        recorded = _sidecar(lib).read_text().split()[0]
        return lib.is_file() and not lib.is_symlink() and _file_sha256(lib) == recorded
    except (OSError, IndexError):
        return False


def _check_library(path: Path, cc: str, cmd: list[str]) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    if head != _ELF_MAGIC:
        raise BuildError(
            f"C compiler {cc} reported success but wrote no shared library "
            f"({' '.join(cmd)}); set CC to a working C compiler (gcc or clang)"
        )


@contextmanager
def _key_lock(lock: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock` (created if missing, removed on exit).

    Threads and processes building the same key wait here for each other. Removing the file can let a late
    arrival lock a fresh file while another still holds the old one; both then find the finished library
    (or, after a failed build, both compile): never a wrong result, at worst a duplicated build.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


def _cached(lib: Path) -> bool:
    """True (counted as a hit) when `lib` is cached and intact; a damaged entry is counted as rebuilt."""
    if lib.exists() or lib.is_symlink():
        if verified(lib):
            STATS["cache_hits"] += 1
            return True
        STATS["rebuilt"] += 1  # truncated, replaced or unrecorded: never trusted
    return False


def compile_source(source: str, name: str, flags: tuple[str, ...], cache: str | None = None) -> Path:
    """Return the path of the compiled library for `source`, compiling only on a cache miss.

    `name` (letters, digits and _) becomes part of the file name. A cached library whose bytes do
    not match its recorded sha256 is rebuilt. While another thread or process compiles the same
    source and flags, this waits for it and returns its library.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise BuildError(
            f"kernel name {name!r} must be 1-120 letters, digits or _ (it names a file in the cache)"
        )
    cc = find_compiler()
    key = source_key(source, flags, cc)
    d = cache_dir(cache)
    lib = d / f"{name}_{key}.so"
    if verified(lib):  # the common case, without touching a lock file
        STATS["cache_hits"] += 1
        return lib
    with _key_lock(d / f".{name}_{key}.lock"):
        if not _cached(lib):
            _compile(source, cc, flags, d / f"{name}_{key}.c", lib)
    return lib


def _compile(source: str, cc: str, flags: tuple[str, ...], src: Path, lib: Path) -> None:
    """Compile `source` (written to `src`) and move the checked library to `lib`, then write its sidecar."""
    d = src.parent
    atomic_write(src, source)
    fd, tmp = tempfile.mkstemp(prefix=f".{lib.name}.", suffix=".so", dir=d)
    os.close(fd)
    cmd = [cc, *flags, "-o", tmp, str(src), "-lm"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise BuildError(
                f"C compiler {cc} failed on {src} (exit {res.returncode}):\n"
                f"{' '.join(cmd)}\n{res.stderr[-4000:]}\nFix the template, or use "
                f"target=\"portable\" / target=\"reference\"."
            )
        _check_library(Path(tmp), cc, cmd)
        digest = _file_sha256(Path(tmp))
        _sidecar(lib).unlink(missing_ok=True)
        os.replace(tmp, lib)
        atomic_write(_sidecar(lib), f"{digest}  {lib.name}\n")
        STATS["compiles"] += 1
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_library(path: Path) -> ctypes.CDLL:
    """ctypes-load a library once per process; one that cannot be loaded is removed from the cache."""
    key = str(path)
    with _LOCK:
        if key not in _LOADED:
            try:
                _LOADED[key] = ctypes.CDLL(key)
            except OSError as exc:
                Path(path).unlink(missing_ok=True)
                _sidecar(Path(path)).unlink(missing_ok=True)
                raise BuildError(
                    f"cannot load compiled kernel {path} ({exc}); it was removed from the cache, build again"
                ) from None
        return _LOADED[key]


def build_library(source: str, name: str, flags: tuple[str, ...], cache: str | None = None) -> ctypes.CDLL:
    """Compile (or fetch from cache) and load `source`."""
    return load_library(compile_source(source, name, flags, cache))
