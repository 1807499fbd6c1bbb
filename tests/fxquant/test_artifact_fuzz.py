"""Seeded fuzzing of manifest.json: every mutation loads to the same outputs or raises ArtifactError.

Never another exception, a crash, code execution (a canary file that injected payloads try to
create) or a file opened outside the artifact folder, the kernel cache and the Python installation
(watched with an audit hook). Only manifest.json changes; every checksum it lists stays valid, as
a deliberate attacker would leave it.
"""
from __future__ import annotations

import copy
import json
import os
import random
import sys
import time
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant.artifact_check import compare_outputs
from fxquant.zoo import KeywordCNN

X = torch.randn(2, 1, 10, 10, generator=torch.Generator().manual_seed(1))
_AUDIT = {"active": False, "events": []}


def _audit(event: str, args: tuple) -> None:
    if _AUDIT["active"] and event in ("open", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn",
                                      "os.spawn", "os.fork", "ctypes.dlopen", "os.remove", "os.rename",
                                      "shutil.rmtree"):
        _AUDIT["events"].append((event, args[0] if args else None))


sys.addaudithook(_audit)


def _payloads(canary: Path) -> list:
    c = str(canary)
    return [
        f"__import__('os').system('touch {c}')",
        f"x=__import__('os').system('touch {c}')",
        f"\")\n__import__('os').system('touch {c}')\n#",
        f"open('{c}','w')",
        f"'); open('{c}', 'w'); ('",
        f"x;\n#include \"/etc/passwd\"\n__attribute__((constructor)) "
        f"static void f(void){{system(\"touch {c}\");}}",
        "torch.ops.aten.from_file.default",
        "../../../etc/hostname",
        "/etc/hostname",
        "32/../../x",
        "kernels/../../x.c",
        "builtins.eval",
        "os.system",
        "subprocess.Popen",
        "fxquant.ops.LoweredOp",
        "__class__",
        "_guards_fn",
        "training",
        "self",
        "0" * 300,
        "",
        "\x00",
        "é",
    ]


_SCALARS = [
    0,
    1,
    -1,
    2,
    3,
    5,
    7,
    8,
    9,
    16,
    63,
    64,
    65,
    1 << 31,
    1 << 62,
    -(1 << 62),
    10**30,
    0.5,
    -2.5,
    1e308,
    True,
    False,
    None,
    [],
    {},
    [[[[]]]],
    {"node": "x"},
    {"tuple": [1, 2]},
    {"float": "nan"},
    {"dtype": "float64"},
    {"device": "meta"},
    {"torch": "channels_last"},
    ["a", 1],
    {"alias": "x"},
    {"alias": []},
    {"alias": {"a": 1}},
    {"node": []},
    {"node": {"x": 1}},
    {"tuple": "x"},
    {"tuple": {}},
    {"float": 1},
    {"float": []},
    {"dtype": []},
    {"dtype": {}},
    {"device": []},
    {"torch": {}},
    {"a": 1, "b": 2},
    [[1], [2]],
    "-inf",
    -0.0,
    2**53 + 1,
]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _mutate(manifest: dict, rng: random.Random, payloads: list, strings: list) -> str:
    """Apply one random mutation in place; returns its description."""
    paths = [p for p in _paths(manifest) if p]
    path = rng.choice(paths)
    parent, key = _get(manifest, path[:-1]), path[-1]
    old = parent[key]
    kind = rng.randrange(8)
    if kind == 0:
        parent[key] = rng.choice(payloads)
    elif kind == 1:
        parent[key] = copy.deepcopy(rng.choice(_SCALARS))
    elif kind == 2 and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = rng.choice(
            [old + 1, old - 1, old * 2, -old, old // 2 if isinstance(old, int) else old / 3]
        )
    elif kind == 3:
        del parent[key]
        return f"delete {path}"
    elif kind == 4 and isinstance(old, (dict, list)):
        if isinstance(old, dict):
            old[rng.choice(payloads + ["extra"])] = rng.choice(_SCALARS)
        elif old:
            i, j = rng.randrange(len(old)), rng.randrange(len(old))
            old[i], old[j] = old[j], old[i]
            if rng.random() < 0.5:
                old.append(copy.deepcopy(old[i]))
        return f"reshape {path}"
    elif kind == 5:
        parent[key] = rng.choice(strings)
    elif kind == 6 and isinstance(old, str):
        parent[key] = old + rng.choice(payloads)
    else:
        parent[key] = copy.deepcopy(_get(manifest, rng.choice(paths)))
    return f"set {path} = {str(parent[key])[:60]!r} (was {str(old)[:40]!r})"


def _strings(manifest) -> list[str]:
    return sorted({_get(manifest, p) for p in _paths(manifest) if isinstance(_get(manifest, p), str)})


@pytest.fixture(scope="module")
def original(tmp_path_factory, one_thread):
    cm = fxquant.compile_lowbit(KeywordCNN().eval(), (torch.randn(2, 1, 10, 10),), bits=4, target="reference")
    folder = tmp_path_factory.mktemp("fuzz") / "art"
    cm.save(folder)
    fxquant.load(
        folder
    )  # once unwatched: one-time probes of the process (ctypes.util.find_library) happen here
    return folder, json.loads((folder / "manifest.json").read_text()), cm(X)


def _allowed(path: str, folder: Path) -> bool:
    path = os.path.realpath(path) if isinstance(path, str) else ""
    roots = [
        str(folder.resolve()),
        os.path.realpath(fxquant.codegen.cache_dir()),
        os.path.realpath(sys.prefix),
        os.path.realpath(sys.base_prefix),
        str(Path(fxquant.__file__).resolve().parents[1]),
        "/proc/cpuinfo",
        "/dev/null",
        os.path.realpath(torch.__file__).rsplit("/", 2)[0],
    ]
    return any(path == r or path.startswith(r + "/") for r in roots)


def _trial(folder: Path, manifest: dict, target: str, canary: Path, want, strict: bool) -> str | None:
    """Load the mutated artifact; None when fine, else what went wrong."""
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _AUDIT["events"].clear()
    _AUDIT["active"] = True
    try:
        loaded = fxquant.load(folder, target=target)
        got = loaded(X.clone())
        problem = compare_outputs(got, [want]) if strict else None
        if problem is not None:
            return f"loaded with other outputs: {problem}"
    except fxquant.ArtifactError:
        pass
    except Exception as exc:  # noqa: BLE001 - the point of the test
        return f"raised {type(exc).__name__}: {str(exc)[:300]}"
    finally:
        _AUDIT["active"] = False
    if canary.exists():
        return "an injected payload ran (the canary file exists)"
    for event, arg in _AUDIT["events"]:
        arg = os.fsdecode(arg) if isinstance(arg, (str, bytes)) else ""
        if event == "subprocess.Popen" and arg == fxquant.codegen.find_compiler():
            continue  # kernels are rendered from checked values and compiled into the cache
        if event in (
            "os.system",
            "os.exec",
            "os.posix_spawn",
            "os.spawn",
            "os.fork",
            "subprocess.Popen",
        ) or not _allowed(arg, folder):
            return f"audit event {event} {arg!r} during load"
    return None


def _fuzz(original, tmp_path, seed: int, trials: int, mutations: int, target: str) -> list[str]:
    folder, manifest, want = original
    work = tmp_path / "art"
    import shutil

    shutil.copytree(folder, work)
    canary = tmp_path / "canary"
    rng = random.Random(seed)
    payloads, strings = _payloads(canary), _strings(manifest)
    failures = []
    for trial in range(trials):
        mutated = copy.deepcopy(manifest)
        what = [_mutate(mutated, rng, payloads, strings) for _ in range(mutations)]
        problem = _trial(work, mutated, target, canary, want, strict=mutations == 1)
        if problem:
            failures.append(f"trial {trial} ({'; '.join(what)}): {problem}")
    return failures


def test_unmutated_artifact_passes_the_harness(original, tmp_path):
    folder, manifest, want = original
    assert _fuzz(original, tmp_path, seed=0, trials=0, mutations=1, target="reference") == []
    assert _trial(folder, manifest, "reference", tmp_path / "canary", want, strict=True) is None


def test_1000_single_mutations_load_the_same_model_or_raise_artifact_error(original, tmp_path):
    start = time.perf_counter()
    failures = _fuzz(original, tmp_path, seed=13, trials=1000, mutations=1, target="reference")
    assert failures == [], "\n".join(failures[:10])
    assert time.perf_counter() - start < 120


def test_stacked_mutations_never_escape(original, tmp_path):
    """Three mutations at once may describe another valid model; they must still never run code or crash."""
    failures = _fuzz(original, tmp_path, seed=7, trials=250, mutations=3, target="reference")
    assert failures == [], "\n".join(failures[:10])


def test_mutations_with_kernels_attached(original, tmp_path):
    fxquant.load(original[0], target="native")  # kernels into the cache first
    failures = _fuzz(original, tmp_path, seed=5, trials=60, mutations=1, target="native")
    assert failures == [], "\n".join(failures[:10])


def test_payload_in_every_string_field_never_runs(original, tmp_path):
    folder, manifest, want = original
    work = tmp_path / "art"
    import shutil

    shutil.copytree(folder, work)
    canary = tmp_path / "canary"
    failures = []
    string_paths = [p for p in _paths(manifest) if p and isinstance(_get(manifest, p), str)]
    keys = [
        p
        for p in _paths(manifest)
        if p and isinstance(p[-1], str) and isinstance(_get(manifest, p[:-1]), dict)
    ]
    for i, payload in enumerate(_payloads(canary)[:4]):
        for path in string_paths:
            mutated = copy.deepcopy(manifest)
            _get(mutated, path[:-1])[path[-1]] = payload
            problem = _trial(work, mutated, "reference", canary, want, strict=True)
            if problem:
                failures.append(f"{path} = {payload[:40]!r}: {problem}")
        for path in keys[i::4]:  # every dict key (names of modules, tensors, files) once
            mutated = copy.deepcopy(manifest)
            parent = _get(mutated, path[:-1])
            parent[payload] = parent.pop(path[-1])
            problem = _trial(work, mutated, "reference", canary, want, strict=True)
            if problem:
                failures.append(f"key {path} -> {payload[:40]!r}: {problem}")
    assert failures == [], "\n".join(failures[:10])
    assert not canary.exists()
