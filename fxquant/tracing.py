"""Capture a model as the canonical fx graph (see fxquant.ir) with a ladder of tracers.

Rungs, in order: torch.export with dynamic batch/time dims, torch.export with the example inputs'
static shapes, then fx.symbolic_trace (lowered through a static export). Each rung runs on fresh
copies of the example inputs: torch.export marks the tensors it traced dynamically
(`_dynamo_weak_dynamic_indices`), and a failed dynamic attempt would otherwise make the static one
fail the same way. When every rung fails, the CaptureError lists what each one said.

Example:
    >>> import torch
    >>> gm = capture(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    ['linear.default']
"""
from __future__ import annotations

import contextlib
import re
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from . import ir
from .errors import CaptureError, ConfigError

METHODS = ("auto", "export", "symbolic")
RUNGS = {
    "auto": ("export-dynamic", "export-static", "symbolic"),
    "export": ("export-dynamic", "export-static"),
    "symbolic": ("symbolic",),
}
RUNG_LABELS = {
    "export-dynamic": "torch.export with dynamic batch/time dims",
    "export-static": "torch.export with the example inputs' static shapes",
    "symbolic": "torch.fx.symbolic_trace",
}
_TORCH_DIR = str(Path(torch.__file__).parent)
REMEDIES = (
    "Remedies: (1) compile only the traceable parts and keep your own Python loop: "
    "compile_lowbit(model, inputs, submodules=['encoder', 'decoder.blocks.*']); (2) for symbolic tracing, "
    "make the offending submodule a leaf or pass its Python-level flags as concrete args; "
    "(3) replace data-dependent Python control flow (if/for on tensor values) with tensor ops such as "
    "torch.where."
)


def check_inputs(model: Any, example_inputs: Any) -> tuple:
    """Validate the model and example inputs; returns the inputs as a tuple."""
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; "
            f"wrap functions in an nn.Module whose forward calls them"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise ConfigError(
            f"example_inputs must be a tuple of tensors (the positional arguments of "
            f"model.forward), got {type(example_inputs).__name__}"
        )
    for i, arg in enumerate(example_inputs):
        if not isinstance(arg, (torch.Tensor, int, float, bool, type(None))):
            raise ConfigError(
                f"example_inputs[{i}] is a {type(arg).__name__}; fxquant accepts tensors and "
                f"plain numbers/bools/None as positional arguments"
            )
        if isinstance(arg, torch.Tensor) and arg.device.type != "cpu":
            raise ConfigError(
                f"example_inputs[{i}] is on device {arg.device}; fxquant compiles for the CPU and "
                f"needs real example values: pass a CPU tensor with data"
            )
        if isinstance(arg, torch.Tensor) and 0 in arg.shape:
            raise ConfigError(
                f"example_inputs[{i}] has shape {tuple(arg.shape)} with a zero-size dimension; "
                f"calibration needs data: give at least one sample along every dimension"
            )
        if (
            isinstance(arg, torch.Tensor)
            and arg.is_floating_point()
            and (torch.isnan(arg).any() or torch.isposinf(arg).any())
        ):
            raise ConfigError(
                f"example_inputs[{i}] contains NaN or +Inf; give finite example inputs "
                f"(-inf is allowed, as in additive attention masks)"
            )
    return tuple(example_inputs)


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """Silence torch's own warnings/graph prints while a tracer attempt may fail (we report it ourselves)."""
    import logging

    import io

    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily put a model in eval mode (inference graphs), restoring each module's flag."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def capture(model: nn.Module, example_inputs: tuple, method: str = "auto") -> fx.GraphModule:
    """Trace `model` on `example_inputs` into the canonical graph; raises CaptureError with remedies."""
    if method not in METHODS:
        raise ConfigError(f"capture method must be one of {METHODS}, got {method!r}")
    example_inputs = check_inputs(model, example_inputs)
    names = {id(m): name for name, m in model.named_modules()}
    with eval_mode(model):
        try:
            with torch.no_grad():
                model(*example_inputs)
        except Exception as exc:
            where = _locate(exc, names)
            raise CaptureError(
                f"the model raised {type(exc).__name__} when run eagerly on the example inputs "
                f"{_describe(example_inputs)}{where}: {exc}\nCheck the inputs' number, "
                f"shapes and dtypes against {type(model).__name__}.forward."
            ) from exc
        failures: list[tuple[str, BaseException]] = []
        for rung in RUNGS[method]:
            try:
                with quiet_torch_logs():
                    gm = _RUNG_FNS[rung](model, _fresh(example_inputs))
            except Exception as exc:
                failures.append((rung, exc))
                continue
            canonicalize(gm, "symbolic" if rung == "symbolic" else "export")
            gm.meta["fxquant_capture_rung"] = rung
            return gm
    raise CaptureError(_failure_message(model, failures, names))


def _fresh(example_inputs: tuple) -> tuple:
    """New tensor objects with the same values: a tracer's marks on one attempt's inputs stay there."""
    return tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in example_inputs)


def _dynamic_spec(example_inputs: tuple) -> tuple:
    """Let export keep batch (dim 0) and the axes where speech models put time (dim 1 or the last) dynamic.

    Dim.AUTO specialises an axis the model fixes (channels, features). Marking every axis AUTO costs
    much more tracing time (BC-ResNet: 34 s instead of 5 s), so middle axes stay static.
    """
    dim = torch.export.Dim.AUTO
    return tuple(
        {i: dim for i in sorted({0, 1, a.dim() - 1}) if i < a.dim()}
        if isinstance(a, torch.Tensor) and a.dim()
        else None
        for a in example_inputs
    )


def _export_dynamic(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """Dynamic where the model allows it (batch and time lengths usually do)."""
    return torch.export.export(
        model, example_inputs, dynamic_shapes=_dynamic_spec(example_inputs), strict=False
    ).module()


def _export_static(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """Every size fixed to the example inputs' (call with those sizes, or compile once per size)."""
    return torch.export.export(model, example_inputs, strict=False).module()


def _symbolic(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """fx.symbolic_trace, then a static export of the traced module to reach the ATen canonical form."""
    traced = fx.symbolic_trace(model)
    ep = torch.export.export(traced, example_inputs, strict=False)  # lower to the ATen canonical form
    return ep.module()


_RUNG_FNS = {"export-dynamic": _export_dynamic, "export-static": _export_static, "symbolic": _symbolic}

_PATH_PATTERNS = [
    (re.compile(r"^L\['self'\]\.?"), ""),
    (re.compile(r"^L__self___?"), ""),
    (re.compile(r"getattr\((.*?), '(\w+)'\)"), r"\1.\2"),
    (re.compile(r"\._modules\['(\w+)'\]"), r".\1"),
    (re.compile(r"\[(\d+)\]"), r".\1"),
]


def _module_path(raw: str) -> str:
    for _ in range(3):  # nested getattr(...) forms
        for pat, rep in _PATH_PATTERNS:
            raw = pat.sub(rep, raw)
    return raw.strip(".")


def _user_source(stack_trace: str | None) -> str:
    """'file.py:LINE' of the innermost frame outside torch itself."""
    if not stack_trace:
        return ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', stack_trace)
    for path, line in reversed(frames):
        if not path.startswith(_TORCH_DIR):
            return f"{Path(path).name}:{line}"
    return ""


def canonicalize(gm: fx.GraphModule, method: str) -> None:
    """Write the IR contract's module/source/provenance meta onto every node of a captured graph."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        path, type_name = "", ""
        if stack:
            raw_path, mod_type = list(stack.values())[-1]
            path = _module_path(raw_path)
            type_name = str(getattr(mod_type, "__name__", mod_type)).rsplit(".", 1)[-1]
        if node.op == "get_attr":
            path = str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else ""
        if node.op == "call_module" and node.target == "_guards_fn":
            path, type_name = "", "guards"
        node.meta[ir.MODULE] = path
        node.meta[ir.MODULE_TYPE] = type_name
        node.meta[ir.SOURCE] = _user_source(node.meta.get("stack_trace"))
        node.meta[ir.PROVENANCE] = (f"capture: {method}",)
    gm.meta["fxquant_capture"] = method
    gm.recompile()


def _locate(exc: BaseException, names: dict[int, str]) -> str:
    """' in module X (file:line: code)' for the deepest frame of exc running inside a module of the model."""
    found = ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        owner = frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
        if id(owner) in names and not code.co_filename.startswith(_TORCH_DIR):
            label = names[id(owner)] or "<root>"
            found = (
                f" in module '{label}' ({type(owner).__name__}) at "
                f"{Path(code.co_filename).name}:{lineno}: {_line_text(code.co_filename, lineno)}"
            )
    cause = exc.__cause__ or exc.__context__
    if not found and cause is not None and cause is not exc:
        return _locate(cause, names)
    return found


def _line_text(filename: str, lineno: int) -> str:
    import linecache

    return linecache.getline(filename, lineno).strip()


def _describe(example_inputs: tuple) -> str:
    parts = [
        f"{tuple(a.shape)} {str(a.dtype).replace('torch.', '')}" if isinstance(a, torch.Tensor) else repr(a)
        for a in example_inputs
    ]
    return "(" + ", ".join(parts) + ")"


def _first_lines(exc: BaseException, limit: int = 8) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    body = "\n      ".join(text[:limit])
    return body + ("\n      ..." if len(text) > limit else "")


def _failure_message(model: nn.Module, failures: list, names: dict[int, str]) -> str:
    lines = [f"could not capture {type(model).__name__} as an fx graph."]
    for rung, exc in failures:
        lines.append(f"  {RUNG_LABELS[rung]} failed{_locate(exc, names) or ''}:\n      {_first_lines(exc)}")
    lines.append(REMEDIES)
    return "\n".join(lines)
