"""pyproject lists every package, so a plain `pip install .` ships all of fxquant (.ci/run tests it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_folder_with_an_init_is_a_listed_package():
    config = _config()
    on_disk = {
        ".".join((pkg, *init.parent.relative_to(ROOT / folder).parts))
        for pkg, folder in config["package-dir"].items()
        for init in (ROOT / folder).rglob("__init__.py")
    }
    listed = set(config["packages"])
    assert on_disk - listed == set(), (
        f"missing from pyproject's [tool.setuptools] packages: {sorted(on_disk - listed)}"
    )
    assert {"fxquant.quantizers", "fxquant.models", "fxquant.passes", "fxquant.codegen"} <= listed


def test_passes_and_codegen_install_inside_fxquant_only():
    config = _config()
    assert config["package-dir"]["fxquant.passes"] == "passes"
    assert config["package-dir"]["fxquant.codegen"] == "codegen"
    assert not {"passes", "codegen"} & set(config["packages"])
