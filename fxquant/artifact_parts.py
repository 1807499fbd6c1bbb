"""Artifacts of `compile_lowbit(..., submodules=[...])`: one module artifact per compiled part.

The model's own Python (decode loops, the parts left in float) is code, and artifacts hold no code,
so loading needs the float model: `fxquant.load(dir, model=float_model)` returns a copy of it whose
compiled submodules are replaced by the loaded parts, like compile_lowbit returned.

Layout: manifest.json (kind "submodules", the part names) and parts/<name>/ (a module artifact each).

Example:
    >>> cs = fxquant.compile_lowbit(model, inputs, bits=4, submodules=["encoder"])   # doctest: +SKIP
    >>> cs.save("out/parts")                                                        # doctest: +SKIP
    >>> loaded = fxquant.load("out/parts", model=MyModel())                          # doctest: +SKIP
"""
from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path

from torch import nn

from . import __version__
from . import artifact_schema as S
from .artifact_files import FORMAT, staged_dir
from .errors import ArtifactError

_KEYS = ("format", "format_version", "fxquant_version", "torch_version", "kind", "parts")


def save_parts(cs, directory: str | os.PathLike) -> Path:
    """Write each compiled part of a CompiledSubmodules to directory/parts/<name> (atomically as a whole)."""
    from .artifact import FORMAT_VERSION, save

    directory = Path(directory)
    with staged_dir(directory) as tmp:
        for name, cm in cs.compiled.items():
            save(cm, tmp / "parts" / S.dotted(name, "parts"))
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "fxquant_version": __version__,
                    "torch_version": __import__("torch").__version__, "kind": "submodules",
                    "parts": list(cs.compiled)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return directory


def _part_dir(directory: Path, name: str) -> Path:
    path = directory / "parts" / name
    for p in (directory / "parts", path):
        try:
            mode = os.lstat(p).st_mode
        except FileNotFoundError:
            raise ArtifactError(f"{directory} lacks {p.relative_to(directory)}; the artifact is incomplete") from None
        if not stat.S_ISDIR(mode):
            raise ArtifactError(f"{p} is not a plain folder (a symbolic link or a file): tampered artifact")
    return path


def load_parts(directory: Path, manifest: dict, target: str | None, model: nn.Module | None, check: bool):
    """Rebuild a CompiledSubmodules around `model` from a submodules artifact."""
    from .artifact import load
    from .runtime import CompiledSubmodules, tensor_bytes

    S.want_dict(manifest, "(top level)", required=_KEYS)
    names = [S.dotted(n, f"parts[{i}]") for i, n in enumerate(S.want_list(manifest["parts"], "parts", 1000))]
    if len(set(names)) != len(names) or not names:
        raise S.fail("parts", "needs distinct part names")
    if model is None:
        raise ArtifactError(f"{directory} holds compiled submodules ({', '.join(names)}); their surrounding Python "
                            f"is your model's code, so pass the float model: fxquant.load(dir, model=float_model)")
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"model must be the float nn.Module the parts were compiled from, got "
                            f"{type(model).__name__}")
    result = copy.deepcopy(model)
    compiled = {}
    for name in names:
        try:
            result.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"the model has no submodule {name!r} for the compiled part of that name; pass the "
                                f"model the artifact was compiled from") from None
        cm = load(_part_dir(directory, name), target=target, check=check)
        parent, _, attr = name.rpartition(".")
        setattr(result.get_submodule(parent) if parent else result, attr, cm)
        compiled[name] = cm
    return CompiledSubmodules(result, compiled, fp32_bytes=tensor_bytes(model))
