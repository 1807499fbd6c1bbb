"""The fxquant command line: subcommands, exit codes, errors on stderr."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import fxquant
from fxquant.cli import main


def test_console_script_help():
    exe = shutil.which("fxquant")
    assert exe, "the fxquant console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("compile", "report", "bench", "dump", "passes", "eval", "transcribe", "demo"):
        assert command in out


def test_passes_lists_builtins(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("cleanup", "fold-bn", "const-fold", "propagate-shapes", "assign-precision", "codegen"):
        assert name in out


def test_dump_after_a_pass(capsys):
    assert (
        main(["dump", "kws-cnn", "--after", "fold-bn", "--passes", "cleanup,fold-bn,propagate-shapes"]) == 0
    )
    out = capsys.readouterr().out
    assert "conv2d" in out and "fc1" in out and "fold-bn" not in out.split("\n")[0]
    assert "shape" in out.split("\n")[0]


def test_compile_prints_report_and_saves(tmp_path, capsys):
    out_dir = tmp_path / "art"
    assert main(["compile", "kws-cnn", "--bits", "8", "--target", "reference", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "W8 uniform/channel A8" in out and "bits=8" in out and f"saved to {out_dir}" in out
    assert fxquant.load(out_dir).report_rows()[0]["format"].startswith("W8")


def test_bench_prints_both_variants(capsys):
    assert main(["bench", "kws-cnn", "--bits", "4", "--target", "reference", "--reps", "3"]) == 0
    out = capsys.readouterr().out
    assert "kws-cnn on (2, 1, 10, 10)" in out and "median of 3 calls" in out
    assert "fp32 (torch)" in out and "fxquant (4.00 bits)" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["dump", "nope:factory"], "cannot load factory 'nope:factory'"),
        (
            ["dump", "kws-cnn", "--after", "quantize", "--passes", "cleanup"],
            "--after 'quantize' is not in the pipeline",
        ),
        (["compile", "kws-cnn", "--passes", "cleanup,fold-bnn"], "unknown pass 'fold-bnn'"),
        (["compile", "mystery"], "unknown model 'mystery'"),
    ],
)
def test_errors_go_to_stderr_with_exit_code_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxquant: error:") and needle in err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["compile", "kws-cnn", "--bits", "5"])
    assert info.value.code == 2


def test_eval_marks_a_variant_that_cannot_be_built(monkeypatch):
    """A budget below the model's smallest size is reported in its row; the measured rows are kept."""
    from fxquant import evaluate
    from fxquant.errors import ConfigError

    def fake_build(name, *a):
        if name == "mixed-1.5":
            raise ConfigError("avg_bits=1.5 is below the smallest achievable size")
        return torch.nn.Identity(), 0.0

    rows: list = []
    monkeypatch.setattr(evaluate, "build_variant", fake_build)
    assert evaluate._build_or_skip("mixed-1.5", None, None, None, "reference", rows, "WER") is None
    assert evaluate._build_or_skip("fp32", None, None, None, "reference", rows, "WER")[1] == 0.0
    text = evaluate.render(rows + [evaluate.EvalRow("fp32", 0.01, 1000, 32.0, 1.0)])
    assert "cannot be built: avg_bits=1.5 is below the smallest achievable size" in text and "1.00 %" in text


def test_compile_bcresnet_without_shared_exits_2(monkeypatch, tmp_path, capsys):
    from fxquant.cli import main

    monkeypatch.setenv("FXQUANT_SHARED", str(tmp_path / "nowhere"))
    assert main(["compile", "bcresnet"]) == 2
    err = capsys.readouterr().err
    assert "FXQUANT_SHARED" in err and "Traceback" not in err


@pytest.mark.parametrize("preset, expected", [(None, "0"), ("7", "7")])
def test_cli_makes_openmp_workers_sleep_unless_the_user_chose(preset, expected):
    """The CLI sets GOMP_SPINCOUNT=0 before torch loads (torch's workers then sleep at barriers instead of
    spinning while their partner has lost its core); a value the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if preset is not None:
        env["GOMP_SPINCOUNT"] = preset
    code = "import sys, fxquant.cli, os; print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [expected, "True"]
