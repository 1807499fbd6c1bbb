"""PassManager instruments: timing, verifier, dumps (all / changed / failure), reproducers on failure."""
from __future__ import annotations

import json

import pytest
import torch

import fxquant
from fxquant import ir
from fxquant.registry import PassResult, register_pass, unregister_pass
from fxquant.zoo import KeywordCNN

X = torch.randn(1, 1, 10, 10)


@pytest.fixture
def exploding_pass():
    @register_pass("explode-test", kind="transform")
    def explode(gm, ctx):
        for node in gm.graph.nodes:  # mutate first, so the reproducer must hold the graph from before
            node.meta[ir.PROVENANCE] = ("half-done",)
        raise RuntimeError("kaboom in pass")

    yield "explode-test"
    unregister_pass("explode-test")


@pytest.fixture
def contract_breaking_pass():
    @register_pass("break-contract-test", kind="transform")
    def breaker(gm, ctx):
        for node in gm.graph.nodes:
            if node.op == "call_function":
                node.meta[ir.DECISION] = "W4"  # not a QuantDecision
        return PassResult(changed=True)

    yield "break-contract-test"
    unregister_pass("break-contract-test")


def test_dumps_after_every_pass(tmp_path):
    cm = fxquant.compile_lowbit(KeywordCNN().eval(), (X,), passes="cleanup,fold-bn,propagate-shapes",
                                dump_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    stems = ["00-captured", "01-cleanup", "02-fold-bn", "03-propagate-shapes"]
    assert names == sorted(f"{s}{ext}" for s in stems for ext in (".dot", ".json", ".txt"))
    table = (tmp_path / "03-propagate-shapes.txt").read_text()
    assert "conv2d" in table and "1x16x10x10" in table and "fc1" in table
    data = json.loads((tmp_path / "03-propagate-shapes.json").read_text())
    linear = next(n for n in data["nodes"] if n["node"] == "linear")
    assert linear["module"] == "fc1" and linear["shape"] == "1x128" and linear["inputs"][0] == "flatten"
    dot = (tmp_path / "03-propagate-shapes.dot").read_text()
    assert 'subgraph "cluster_fc1"' in dot and '"flatten" -> "linear";' in dot
    assert [t.name for t in cm.timings] == ["cleanup", "fold-bn", "propagate-shapes"]


def test_dump_only_after_changes(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    fxquant.compile_lowbit(model, (torch.randn(2, 4),), passes="cleanup,fold-bn,propagate-shapes",
                           dump_dir=tmp_path, dump_mode="changed")
    assert sorted(p.stem for p in tmp_path.glob("*.txt")) == ["01-cleanup"]


def test_env_var_enables_dumps(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQUANT_DUMP", str(tmp_path / "env"))
    fxquant.compile_lowbit(KeywordCNN().eval(), (X,), passes="cleanup")
    assert (tmp_path / "env" / "01-cleanup.txt").exists()


def test_failing_pass_names_itself_and_writes_only_a_reproducer(tmp_path, exploding_pass):
    with pytest.raises(fxquant.PassFailure) as info:
        fxquant.compile_lowbit(
            KeywordCNN().eval(),
            (X,),
            passes=f"cleanup,fold-bn,{exploding_pass},propagate-shapes",
            dump_dir=tmp_path,
        )
    msg = str(info.value)
    assert "pass 'explode-test' (step 3 of pipeline 'cleanup,fold-bn,explode-test,propagate-shapes')" in msg
    assert "RuntimeError: kaboom in pass" in msg and "passes before it: cleanup, fold-bn" in msg
    repro = tmp_path / "reproducer-03-explode-test"
    assert str(repro) in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == [repro.name]  # no partial per-pass dumps
    assert (repro / "failing_pipeline.txt").read_text() == "explode-test,propagate-shapes\n"
    before = (repro / "graph_before.txt").read_text()
    assert "half-done" not in before and "capture: export" in before
    assert "torch.ops.aten.linear.default" in (repro / "graph_before.py").read_text()
    assert "kaboom in pass" in (repro / "error.txt").read_text()


def test_failure_without_dump_dir_writes_reproducer_to_tmp(exploding_pass):
    with pytest.raises(
        fxquant.PassFailure, match=r"reproducer \(graph before the pass \+ pipeline text\): /"
    ):
        fxquant.compile_lowbit(KeywordCNN().eval(), (X,), passes=exploding_pass)


def test_verifier_catches_contract_violations(tmp_path, contract_breaking_pass):
    with pytest.raises(fxquant.FxQuantError) as info:
        fxquant.compile_lowbit(
            KeywordCNN().eval(), (X,), passes=f"cleanup,{contract_breaking_pass}", dump_dir=tmp_path
        )
    assert "breaks the IR contract" in str(info.value) and "must be a QuantDecision" in str(info.value)
    assert "raised by pass 'break-contract-test' (step 2" in " ".join(info.value.__notes__)
    assert list(tmp_path.iterdir()) == []


def test_bad_dump_mode():
    with pytest.raises(fxquant.PipelineError, match="dump_mode must be one of"):
        fxquant.PassManager("cleanup", dump_dir="/tmp/x", dump_mode="sometimes")


def test_unknown_pass_leaves_no_dump(tmp_path):
    with pytest.raises(fxquant.PipelineError):
        fxquant.compile_lowbit(KeywordCNN().eval(), (X,), passes="cleanup,nope", dump_dir=tmp_path / "d")
    assert not (tmp_path / "d").exists()
