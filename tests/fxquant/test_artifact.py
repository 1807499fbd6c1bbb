"""save/load: exact round trip, no pickle, and clear errors for truncated, corrupted or tampered artifacts."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

import fxquant
from fxquant.artifact import pack_codes, unpack_codes
from fxquant.zoo import KeywordCNN

X = torch.randn(3, 1, 10, 10)


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    return fxquant.compile_lowbit(KeywordCNN().eval(), (X,), bits=4, target="reference")


@pytest.fixture
def saved(compiled, tmp_path):
    return compiled.save(tmp_path / "art")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_code_packing_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (13, 37), dtype=torch.uint8)
    data = pack_codes(codes, bits)
    assert len(data) == -(-codes.numel() // 8) * bits
    assert torch.equal(unpack_codes(data, bits, codes.numel()).view(13, 37), codes)


def test_round_trip_is_exact_and_keeps_the_report(compiled, saved):
    assert sorted(p.name for p in saved.iterdir()) == [
        "forward.py",
        "manifest.json",
        "selftest.bin",
        "weights.bin",
    ]
    loaded = fxquant.load(saved)
    assert torch.equal(loaded(X), compiled(X))
    assert [(r["module"], r["format"], r["decided_by"]) for r in loaded.report_rows()] == [
        (r["module"], r["format"], r["decided_by"]) for r in compiled.report_rows()
    ]
    assert loaded.pipeline == compiled.pipeline
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["torch_version"] == torch.__version__ and manifest["target"] == "reference"
    # 4-bit codes are stored packed: the blob is about the model bytes the report states
    assert (saved / "weights.bin").stat().st_size < 1.2 * compiled.summary()["model_bytes"]


def test_native_artifact_has_kernel_sources_and_reloads(tmp_path):
    cm = fxquant.compile_lowbit(
        nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval(),
        (torch.randn(2, 64),),
        bits=4,
        passes=fxquant.default_pipeline().replace(",codegen", ",codegen{never_slower=false}"),
    )  # kernels wanted
    path = cm.save(tmp_path / "native")
    assert sorted(p.suffix for p in (path / "kernels").iterdir()) == [".c", ".c"]
    loaded = fxquant.load(path)
    x = torch.randn(5, 64)
    assert all(r["backend"].startswith("c:") for r in loaded.report_rows())
    torch.testing.assert_close(loaded(x), cm(x), rtol=0, atol=0)


def _rewrite_manifest(path, change):
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _set_graph_target(m, old, new):
    for n in m["graph"]["nodes"]:
        if n["target"] == old:
            n["target"] = new


@pytest.mark.parametrize(
    "damage,needle",
    [
        (
            lambda p: (p / "weights.bin").write_bytes((p / "weights.bin").read_bytes()[:1000]),
            "does not match its checksum",
        ),
        (
            lambda p: (p / "weights.bin").write_bytes(b"\x01" + (p / "weights.bin").read_bytes()[1:]),
            "corrupted or was modified",
        ),
        (lambda p: (p / "manifest.json").write_text('{"format": "fxquant-art'), "manifest.json is corrupt"),
        (lambda p: (p / "manifest.json").unlink(), "has no manifest.json: not an fxquant artifact"),
        (lambda p: (p / "forward.py").unlink(), "is missing forward.py"),
        (lambda p: _rewrite_manifest(p, lambda m: m.update(format_version=99)), "uses artifact format 99"),
        (
            lambda p: _rewrite_manifest(p, lambda m: m.pop("tensors")),
            "lacks 'tensors': truncated or tampered",
        ),
        (
            lambda p: _rewrite_manifest(
                p, lambda m: _set_graph_target(m, "torch.ops.aten.flatten.using_ints", "os.system")
            ),
            "call target 'os.system' is not allowed",
        ),
        (
            lambda p: _rewrite_manifest(
                p, lambda m: m["modules"]["fc1_1"].update({"class": "subprocess.Popen"})
            ),
            "modules.fc1_1.class: 'subprocess.Popen' is not one of",
        ),
        (
            lambda p: _rewrite_manifest(p, lambda m: m["tensors"]["fc1_1.scales"].update(offset=10**9)),
            "does not fit weights.bin",
        ),
    ],
)
def test_damaged_artifacts_are_clear_errors(saved, damage, needle):
    damage(saved)
    with pytest.raises(fxquant.ArtifactError) as info:
        fxquant.load(saved)
    assert needle in str(info.value)


def test_out_of_range_codes_with_matching_checksums_are_caught(saved):
    m = json.loads((saved / "manifest.json").read_text())
    spec = m["tensors"]["fc2_1.table_index"]
    blob = bytearray((saved / "weights.bin").read_bytes())
    blob[spec["offset"] : spec["offset"] + 4] = (1000).to_bytes(4, "little")
    (saved / "weights.bin").write_bytes(bytes(blob))
    m["files"]["weights.bin"] = hashlib.sha256(bytes(blob)).hexdigest()
    (saved / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(fxquant.ArtifactError, match="table_index: values must lie in"):
        fxquant.load(saved)


def test_failed_save_leaves_nothing(compiled, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("fxquant.artifact_files.pack_codes", boom)
    with pytest.raises(OSError, match="disk full"):
        compiled.save(tmp_path / "partial")
    assert list(tmp_path.iterdir()) == []


def test_load_never_unpickles(saved, monkeypatch):
    import pickle

    def forbidden(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    fxquant.load(saved)


class OpenSlice(torch.nn.Module):
    """x[:, 1:]: torch.export records the open end as the int64 maximum."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x[:, 1:])


def test_open_slices_and_interactive_sources_load(tmp_path):
    """An open-ended slice (end 2**63 - 1) and a model typed at a prompt (source '<stdin>:5') load."""
    from fxquant import ir

    x = torch.randn(2, 5, 8)
    cm = fxquant.compile_lowbit(OpenSlice().eval(), (x,), bits=8, target="reference")
    assert any(n.args[3:4] == (2**63 - 1,) for n in cm.graph_module.graph.nodes if "slice" in str(n.target))
    for node in cm.graph_module.graph.nodes:
        node.meta[ir.SOURCE] = "<stdin>:5"
    cm.save(tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(fxquant.load(tmp_path / "art")(x), cm(x))
