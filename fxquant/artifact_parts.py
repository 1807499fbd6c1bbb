"""Artifacts of `compile_lowbit(..., submodules=[...])`: one module artifact per compiled part.

The model's own Python (decode loops, the parts left in float) is code, and artifacts hold no code,
so loading needs the float model: `fxquant.load(dir, model=float_model)` returns a copy of it whose
compiled submodules are replaced by the loaded parts, like compile_lowbit returned.

Layout: manifest.json (kind "submodules", the part names) and parts/<name>/ (a module artifact each).

Imports flow one way: this module writes parts with `artifact_save.save` and checks a parts manifest;
`fxquant.artifact.load` loads each part and assembles the `runtime.CompiledSubmodules`, so neither
this module nor the artifact writer imports the runtime or the loader.

Example:
    >>> cs = fxquant.compile_lowbit(model, inputs, bits=4, submodules=["encoder"])   # doctest: +SKIP
    >>> cs.save("out/parts")                                                        # doctest: +SKIP
    >>> loaded = fxquant.load("out/parts", model=MyModel())                          # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from torch import nn

from . import __version__
from . import artifact_schema as S
from .artifact_files import FORMAT, staged_dir
from .artifact_manifest import FORMAT_VERSION
from .artifact_save import save
from .errors import ArtifactError

_KEYS = ("format", "format_version", "fxquant_version", "torch_version", "kind", "parts")


def save_parts(cs, directory: str | os.PathLike) -> Path:
    """Write each compiled part of a CompiledSubmodules to directory/parts/<name> (atomically as a whole)."""
    directory = Path(directory)
    with staged_dir(directory) as tmp:
        for name, cm in cs.compiled.items():
            save(cm, tmp / "parts" / S.dotted(name, "parts"))
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "fxquant_version": __version__,
                    "torch_version": __import__("torch").__version__, "kind": "submodules",
                    "parts": list(cs.compiled)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return directory


def part_dir(directory: Path, name: str) -> Path:
    path = directory / "parts" / name
    for p in (directory / "parts", path):
        try:
            mode = os.lstat(p).st_mode
        except FileNotFoundError:
            raise ArtifactError(
                f"{directory} lacks {p.relative_to(directory)}; the artifact is incomplete"
            ) from None
        if not stat.S_ISDIR(mode):
            raise ArtifactError(f"{p} is not a plain folder (a symbolic link or a file): tampered artifact")
    return path


def part_names(directory: Path, manifest: dict, model: nn.Module | None) -> list[str]:
    """The validated part names of a submodules manifest, checked against the float `model`."""
    S.want_dict(manifest, "(top level)", required=_KEYS)
    names = [S.dotted(n, f"parts[{i}]") for i, n in enumerate(S.want_list(manifest["parts"], "parts", 1000))]
    if len(set(names)) != len(names) or not names:
        raise S.fail("parts", "needs distinct part names")
    if model is None:
        raise ArtifactError(
            f"{directory} holds compiled submodules ({', '.join(names)}); their surrounding "
            f"Python is your model's code, so pass the float model: "
            f"fxquant.load(dir, model=float_model)"
        )
    if not isinstance(model, nn.Module):
        raise ArtifactError(
            f"model must be the float nn.Module the parts were compiled from, got {type(model).__name__}"
        )
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(
                f"the model has no submodule {name!r} for the compiled part of that name; "
                f"pass the model the artifact was compiled from"
            ) from None
    return names
