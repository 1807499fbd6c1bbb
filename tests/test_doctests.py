"""The docstring examples of fxquant/, passes/ and codegen/ run, as the modules users import.

Each module is imported by its installed name (passes/lower.py as fxquant.passes.lower), so a pass is
never registered twice under two module names (which `pytest --doctest-modules` on the folders would
do). Examples that need a model, a compiler session or ../shared carry `# doctest: +SKIP`.
"""
from __future__ import annotations

import doctest
import importlib
import os

import pytest

from tests.test_architecture import ROOT, module_files

MODULES = sorted(module_files(ROOT))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# Modules whose examples are known to fail as written (strict xfail: the test fails once they are fixed).
FAILING_AS_WRITTEN: set[str] = set()


def _examples(module) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(module, module.__name__) if t.examples]


@pytest.mark.parametrize("name", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason="example known to fail as written"))
    if m in FAILING_AS_WRITTEN else m for m in MODULES])
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    module = importlib.import_module(name)
    tests = _examples(module)
    if not tests:
        pytest.skip("no docstring examples")
    monkeypatch.chdir(tmp_path)                          # examples that write files write them here
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    out: list[str] = []
    for test in tests:
        runner.run(test, out=out.append)
    result = runner.summarize(verbose=False)
    failed = f"{result.failed} of {result.attempted} examples failed in {name}:\n"
    assert result.failed == 0, failed + "".join(out)


def test_the_examples_are_many_and_found_by_installed_name():
    counted = {}
    for name in MODULES:
        if name.startswith(("fxquant.asr", "fxquant.models")):
            continue
        module = importlib.import_module(name)
        counted[name] = sum(len(t.examples) for t in _examples(module))
    assert counted["fxquant.passes.calibrate"] >= 3 and counted["fxquant.analysis"] >= 5
    assert sum(counted.values()) >= 100, counted
    assert os.path.basename(importlib.import_module("fxquant.passes.lower").__file__) == "lower.py"
