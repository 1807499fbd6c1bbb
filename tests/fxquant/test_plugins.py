"""Plugins: a pass from a throw-away installed distribution is discovered through its entry point."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant import registry

PLUGIN_SRC = '''
"""A throw-away fxquant plugin: counts linear nodes."""
from dataclasses import dataclass

import torch
import fxquant

FXQUANT_API_VERSION = {version}


@dataclass
class CountOptions:
    prefix: str = "found"


@fxquant.register_pass("count-linears", options=CountOptions, kind="analysis")
def count_linears(gm, ctx):
    n = sum(1 for node in gm.graph.nodes if node.target is torch.ops.aten.linear.default)
    ctx.state["count-linears"] = n
    return fxquant.PassResult(changed=False, message=f"{{ctx.options.prefix}} {{n}} linear nodes")
'''


def _install_plugin(tmp_path: Path, dist: str, version: int) -> Path:
    src = tmp_path / f"{dist}-src"
    (src / dist).mkdir(parents=True)
    (src / dist / "__init__.py").write_text(PLUGIN_SRC.format(version=version))
    (src / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{dist}"
        version = "0.1"
        [project.entry-points."fxquant.passes"]
        count-linears = "{dist}"
        """))
    target = tmp_path / f"{dist}-site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True, capture_output=True)
    return target


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    def install(dist: str, version: int) -> Path:
        site = _install_plugin(tmp_path, dist, version)
        monkeypatch.syspath_prepend(str(site))
        return site

    yield install
    registry.unregister_pass("count-linears")
    for name in [m for m in sys.modules if m.startswith("fxq_plugin_")]:
        del sys.modules[name]
    monkeypatch.undo()
    registry.refresh()


def test_plugin_pass_is_discovered_and_runs_by_name(plugin_site):
    plugin_site("fxq_plugin_ok", registry.API_VERSION)
    registry.refresh()
    info = registry.get_pass("count-linears")
    assert info.origin == "plugin:fxq_plugin_ok" and info.kind == "analysis"
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    cm = fxquant.compile_lowbit(model, (torch.randn(2, 4),), passes="cleanup,count-linears{prefix=saw}")
    assert [t.message for t in cm.timings] == ["removed nothing", "saw 2 linear nodes"]


def test_plugin_for_another_api_version_is_a_clear_error(plugin_site):
    plugin_site("fxq_plugin_old", registry.API_VERSION + 1)
    with pytest.raises(
        fxquant.PluginError, match=r"written for fxquant pass API 2, but this fxquant provides API 1"
    ):
        registry.refresh()


def test_duplicate_pass_name_is_rejected():
    with pytest.raises(fxquant.PipelineError, match="already registered"):

        @fxquant.register_pass("cleanup")
        def other_cleanup(gm, ctx):
            return fxquant.PassResult()


def test_register_pass_validates_its_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        fxquant.register_pass("x", kind="rewrite")
    with pytest.raises(TypeError, match="options must be a dataclass"):
        fxquant.register_pass("x", options=dict)
