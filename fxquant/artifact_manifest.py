"""The manifest's top level and structure: read it safely, check its header, modules, files and inputs.

Both `save` (on what it is about to write) and `load` (on what it reads) run these checks.

Example:
    >>> read_manifest(Path("out/digits-w4"))["format_version"]     # doctest: +SKIP
    2
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import artifact_schema as S
from .artifact_files import FORMAT, check_relpath, open_inside
from .artifact_modules import CLASSES, module_attrs, module_buffers
from .errors import ArtifactError

FORMAT_VERSION = 2
MANIFEST_MAX_BYTES = 256 << 20
TOP_KEYS = (
    "format",
    "format_version",
    "fxquant_version",
    "torch_version",
    "kind",
    "pipeline",
    "target",
    "name",
    "config",
    "fp32_bytes",
    "signature",
    "inputs",
    "decisions",
    "graph",
    "modules",
    "tensors",
    "files",
    "selftest",
)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a JSON object repeats a key")
    return out


def read_manifest(directory: Path) -> dict:
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a folder; give the folder written by compiled.save(dir)")
    if not os.path.lexists(directory / "manifest.json"):
        raise ArtifactError(
            f"{directory} has no manifest.json: not an fxquant artifact (create one with compiled.save(dir))"
        )
    with open_inside(directory, "manifest.json", "manifest.json") as f:
        raw = f.read(MANIFEST_MAX_BYTES + 1)
    if len(raw) > MANIFEST_MAX_BYTES:
        raise ArtifactError(
            f"{directory}/manifest.json is larger than {MANIFEST_MAX_BYTES >> 20} MiB: not an "
            f"fxquant manifest"
        )
    try:
        manifest = json.loads(
            raw.decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_unique_keys
        )
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(
            f"{directory}/manifest.json is corrupt ({str(exc)[:200]}); re-save the artifact"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{directory}/manifest.json is not an fxquant artifact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{directory} uses artifact format {str(manifest.get('format_version'))[:20]}, this "
            f"fxquant reads format {FORMAT_VERSION}; recompile the model with this version"
        )
    return manifest


def check_header(m: dict, directory: Path) -> None:
    for key in TOP_KEYS:
        if key not in m:
            raise ArtifactError(f"{directory}/manifest.json lacks {key!r}: truncated or tampered")
    S.want_dict(m, "(top level)", required=TOP_KEYS, optional=("parts",))
    S.want_enum(m["kind"], ("module",), "kind")
    S.want_text(m["pipeline"], "pipeline", 100_000)
    S.want_enum(m["target"], S.target_names(), "target")
    S.dotted(m["name"], "name", allow_empty=True)
    S.json_data(m["config"], "config")
    S.want_type(m["config"], dict, "config")
    if m["config"].get("fallback") is not None:
        S.want_type(m["config"]["fallback"], bool, "config.fallback")
    S.want_int(m["fp32_bytes"], "fp32_bytes", 0)
    if m["signature"] is not None:
        for i, p in enumerate(S.want_list(m["signature"], "signature", 256)):
            S.ident(p, f"signature[{i}]")
    S.want_list(m["decisions"], "decisions")  # for people only; never read back


def check_graph_data(m: dict) -> None:
    """Structure checks that need no tensors (save runs them on what it writes)."""
    g = S.want_dict(m["graph"], "graph", required=("nodes", "codegen"))
    S.want_list(g["nodes"], "graph.nodes", 1_000_000)
    S.want_dict(m["modules"], "modules", free_keys=True)
    for name, spec in m["modules"].items():
        S.name_segment(name, f"modules key {name[:40]!r}")
        S.want_dict(spec, f"modules.{name}", required=("class", "attrs", "buffers"))
        cls = S.want_enum(spec["class"], CLASSES, f"modules.{name}.class")
        module_attrs(cls, spec["attrs"], f"modules.{name}.attrs")
        module_buffers(cls, spec["buffers"], f"modules.{name}.buffers")
    S.want_dict(m["files"], "files", free_keys=True)
    for rel, digest in m["files"].items():
        check_relpath(rel, "files")
        S.sha256_hex(digest, f"files.{rel}")
    if "weights.bin" not in m["files"]:
        raise S.fail("files", "does not list weights.bin")
    S.input_specs(m["inputs"], "inputs")
