"""Find the cached compiled Whisper of a (checkpoint, precision) without loading the checkpoint.

`cached_compile` keys its artifact folder by a fingerprint of the loaded fp32 weights, so finding it
costs a checkpoint load (parsing model.bin, about half a second). This index remembers, per checkpoint
source, which folder that was: its key is the checkpoint files' names, sizes and modification times, the
precision, fxquant's version, the calibration recipe and the source text of fxquant/asr/compiled.py
(where the artifact key is computed, so changing how artifacts are keyed empties the index). A miss, a
stale entry or an artifact that fails to load falls back to the full path; the artifact itself is always
loaded and checked by `CompiledWhisper.load`. The index lives beside the artifacts
(`FXQUANT_CACHE_DIR`/whisper/index.json).

Example:
    >>> key = index_key("whisper-tiny.en", "avg4")                  # doctest: +SKIP
    >>> remember(key, Path("~/.cache/fxquant/whisper/whisper-tiny.en-avg4-0123"))   # doctest: +SKIP
    >>> lookup(key)                                                  # doctest: +SKIP
    PosixPath('/root/.cache/fxquant/whisper/whisper-tiny.en-avg4-0123')
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["index_key", "lookup", "remember"]

MAX_ENTRIES = 256


def _index_file() -> Path:
    from fxquant.codegen import cache_dir

    return Path(cache_dir()) / "whisper" / "index.json"


def _source_files(model) -> list[Path] | None:
    """The files a checkpoint is read from (zoo name, folder or file), or None when it cannot be named."""
    from fxquant.models.whisper_ckpt import KNOWN_MODELS, resolve_model_dir

    if isinstance(model, str) and model in KNOWN_MODELS:
        path = resolve_model_dir(model)
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model).expanduser()
    else:
        return None
    if path.is_file():
        return [path]
    if not path.is_dir():
        return None
    return sorted(p for p in path.iterdir() if p.is_file())


def index_key(model, precision: str) -> str | None:
    """The index key of a checkpoint source at a precision; None when the source is not files on disk."""
    import fxquant

    from .compiled import __file__ as compiled_py
    from .data import calibration_recipe

    files = _source_files(model)
    if not files:
        return None
    h = hashlib.sha256()
    h.update(json.dumps([str(model), precision, fxquant.__version__, calibration_recipe()]).encode())
    h.update(Path(compiled_py).read_bytes())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _read() -> dict[str, str]:
    try:
        data = json.loads(_index_file().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} \
        if isinstance(data, dict) else {}


def lookup(key: str | None) -> Path | None:
    """The artifact folder recorded for `key` when it still holds a Whisper artifact, else None."""
    if key is None:
        return None
    name = _read().get(key)
    if not name or "/" in name or name.startswith("."):
        return None
    folder = _index_file().parent / name
    return folder if (folder / "whisper.json").is_file() else None


def remember(key: str | None, folder: Path) -> None:
    """Record `folder` (inside the index's folder) for `key`; written atomically, never fails the caller."""
    folder = Path(folder)
    index = _index_file()
    if key is None or folder.parent.resolve() != index.parent.resolve():
        return
    entries = _read()
    entries.pop(key, None)
    entries[key] = folder.name
    entries = dict(list(entries.items())[-MAX_ENTRIES:])
    tmp = index.with_name(f".index-{os.getpid()}.json")
    try:
        tmp.write_text(json.dumps(entries, indent=0))
        os.replace(tmp, index)
    except OSError:
        tmp.unlink(missing_ok=True)
