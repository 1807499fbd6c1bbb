"""A crafted artifact never runs code, reads files outside its folder or writes outside the cache.

Each case edits a real saved artifact the way issue 13's probe did (manifest.json only, or one file,
keeping every checksum valid) and expects an ArtifactError and no side effect.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant.zoo import KeywordCNN

X = torch.randn(2, 1, 10, 10)
_OPENED: list[str] = []
_WATCH = {"on": False}


def _audit(event, args):
    if _WATCH["on"] and event == "open" and isinstance(args[0], (str, bytes)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    return fxquant.compile_lowbit(KeywordCNN().eval(), (X,), bits=4, target="reference")


@pytest.fixture
def art(compiled, tmp_path):
    return compiled.save(tmp_path / "art")


def _edit(path: Path, change) -> None:
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _node(m, op, index=0):
    return [n for n in m["graph"]["nodes"] if n["op"] == op][index]


def _load_fails(path: Path, needle: str, canary: Path | None = None) -> None:
    _OPENED.clear()
    _WATCH["on"] = True
    try:
        with pytest.raises(fxquant.ArtifactError) as info:
            fxquant.load(path)
    finally:
        _WATCH["on"] = False
    assert needle in str(info.value)
    if canary is not None:
        assert not canary.exists()
    outside = [p for p in _OPENED if "/etc/" in p or "hostname" in p or "shadow" in p]
    assert outside == []


def test_placeholder_name_with_code_never_runs(art, tmp_path):
    canary = tmp_path / "canary"
    payload = f"x=__import__('os').system('touch {canary}')"
    _edit(art, lambda m: _node(m, "placeholder").update(target=payload))
    _load_fails(art, "graph.nodes[0].target", canary)


def test_codegen_argument_names_are_identifiers(art, tmp_path):
    canary = tmp_path / "canary"
    _edit(art, lambda m: m["graph"]["codegen"].update(orig_args=[f"x, y=open('{canary}', 'w')"]))
    _load_fails(art, "graph.codegen.orig_args", canary)


def test_module_meta_with_a_newline_is_refused(art, tmp_path):
    canary = tmp_path / "canary"
    _edit(
        art,
        lambda m: _node(m, "call_module").__setitem__(
            "meta",
            dict(_node(m, "call_module")["meta"], module=f'x")\n__import__("os").system("touch {canary}")#'),
        ),
    )
    _load_fails(art, "meta.module", canary)


def test_epilogue_and_conv_groups_come_from_enums_and_ranges(art, tmp_path):
    _edit(
        art,
        lambda m: m["modules"]["fc1_1"]["attrs"].update(
            epilogue='relu; }\n__attribute__((constructor)) static void f(void) { system("id"); } //'
        ),
    )
    _load_fails(art, "modules.fc1_1.attrs.epilogue")
    cache = fxquant.codegen.cache_dir()
    before = set(cache.parent.iterdir())
    _edit(art, lambda m: m["modules"]["fc1_1"]["attrs"].update(epilogue=None))
    _edit(art, lambda m: m["modules"]["conv_1"]["attrs"].update(groups="32/../../x"))
    _load_fails(art, "modules.conv_1.attrs.groups")
    assert set(cache.parent.iterdir()) == before


def test_ops_that_touch_files_are_not_allowed(art, tmp_path):
    _edit(
        art,
        lambda m: [
            n.update(target="torch.ops.aten.from_file.default", args={"tuple": ["/etc/hostname"]})
            for n in m["graph"]["nodes"]
            if n["op"] == "call_function"
        ],
    )
    _load_fails(art, "'aten.from_file' is not an op artifacts may call")


@pytest.mark.parametrize("rel", ["/etc/hostname", "../../etc/shadow", "kernels/../../x", "a/./b", ".hidden"])
def test_file_entries_stay_inside_the_folder(art, rel):
    digest = hashlib.sha256(b"").hexdigest()
    _edit(art, lambda m: m["files"].update({rel: digest}))
    _load_fails(art, "is not a plain relative path inside the artifact folder")


def test_symlinks_are_never_followed(art, tmp_path):
    outside = tmp_path / "outside.py"
    outside.write_text((art / "forward.py").read_text())
    (art / "forward.py").unlink()
    (art / "forward.py").symlink_to(outside)
    _load_fails(art, "is a symbolic link")


def test_a_symlinked_weights_file_is_refused(art, tmp_path):
    moved = tmp_path / "weights.bin"
    os.replace(art / "weights.bin", moved)
    (art / "weights.bin").symlink_to(moved)
    _load_fails(art, "is a symbolic link")


def test_graph_constants_cannot_reach_python_attributes(art):
    def change(m):
        m["tensors"]["__class__.x"] = m["tensors"]["fc2_1.bias"]

    _edit(art, change)
    _load_fails(art, "tensors key")


def test_an_attribute_cannot_smuggle_a_node_or_a_device(art):
    _edit(art, lambda m: m["modules"]["fc1_1"]["attrs"].update(act_bits={"device": "meta"}))
    _load_fails(art, "modules.fc1_1.attrs.act_bits")


def test_consistent_looking_but_wrong_shapes_are_caught_before_any_kernel(art):
    """The codes claim 1600 inputs but the graph feeds fc1 a 16-wide tensor: refused by the abstract run."""

    def change(m):
        flatten = [n for n in m["graph"]["nodes"] if n["target"] == "torch.ops.aten.flatten.using_ints"][0]
        flatten["target"] = "torch.ops.aten.amax.default"
        flatten["args"] = {"tuple": [{"node": "conv_1"}, [2, 3]]}

    _edit(art, change)
    _load_fails(art, "inconsistent at node")


def test_json_constants_and_duplicate_keys_are_corrupt(art):
    text = (art / "manifest.json").read_text()
    (art / "manifest.json").write_text(text.replace('"fp32_bytes": ', '"fp32_bytes": NaN, "fp32_bytes": ', 1))
    _load_fails(art, "manifest.json is corrupt")


def test_unregistered_output_type_says_what_to_import(art):
    def change(m):
        m["graph"]["codegen"]["out_spec"] = json.dumps(
            [
                1,
                {
                    "type": "transformers.modeling_outputs.BaseModelOutput",
                    "context": "null",
                    "children_spec": [],
                },
            ]
        )

    _edit(art, change)
    _load_fails(art, "import that library before fxquant.load")


@pytest.mark.parametrize("fmt, needle", [("int8-rows", "an int8-rows input must be int8"),
                                         ("row-scales", "a row-scales input must follow"),
                                         ("exec", "is not one of")])
def test_an_input_format_must_be_a_consistent_int8_rows_pair(art, fmt, needle):
    _edit(art, lambda m: m["inputs"][0].update(format=fmt))
    _load_fails(art, needle)
