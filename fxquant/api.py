"""`compile_lowbit`: capture -> pipeline of passes -> a drop-in module.

Example:
    >>> import torch, fxquant
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> cm = fxquant.compile_lowbit(model, (torch.randn(4, 64),), bits=8)   # doctest: +SKIP
    >>> cm(torch.randn(4, 64)).shape                                      # doctest: +SKIP
    torch.Size([4, 10])
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import inspect
import os
import sys
from typing import Any, Iterable

import torch
from torch import nn

from .tracing import capture, check_inputs, eval_mode
from .errors import ConfigError
from .passmanager import PassManager
from .pipeline import Pipeline
from .registry import PassContext
from .runtime import CompiledModule, CompiledSubmodules, tensor_bytes

HYGIENE = "cleanup,fold-bn,const-fold,linearize,propagate-shapes"
QUANTIZE = ("calibrate,sensitivity,assign-precision,quantize,tie-embeddings,lower,merge-siblings,fuse-layernorm,"
            "fuse-residual,lower-attention")
VALID_BITS = (8, 4, 3, 2)
SCHEMES = ("uniform", "codebook", "auto")
EXTRA_OPTIONS = {
    "group_size": "group size along K for per-group formats (default 64; 32/64/128)",
    "act_bits": "8 (dynamic per-token int8, default) or None (float activations)",
    "gptq": "error-compensating rounding from calibration statistics (default False)",
    "dump_mode": "'all' | 'changed' | 'failure' (default 'all' when dump_dir is set)",
    "capture_method": "'auto' | 'export' | 'symbolic'",
    "progress": "show progress bars (default: when stderr is a terminal)",
    "fallback": "run the reference path with a warning when no C compiler is available",
    "max_calibration": "use at most this many calibration inputs (default 64)",
    "act_mode": "'dynamic' (per-token int8, default) or 'static' (calibrated per-tensor int8)",
    "symmetric": "symmetric uniform weights (default True); False = asymmetric with zero points",
    "depthwise_bits": "bits for depthwise convs (default 8; None lets the budget solver decide them)",
    "tie_siblings": "give q/k/v-style sibling linears one decision (default True)",
}


def default_pipeline(target: str = "native") -> str:
    """The pipeline compile_lowbit runs when `passes` is None."""
    if target == "reference":
        return f"{HYGIENE},{QUANTIZE}"
    suffix = "codegen" if target == "native" else f"codegen{{target={target}}}"
    return f"{HYGIENE},{QUANTIZE},{suffix}"


def compile_lowbit(model: nn.Module, example_inputs: Any, bits: int | None = None,
                   avg_bits: float | None = None, budget_bytes: int | None = None, scheme: str = "auto",
                   calibration: Iterable | None = None, rules: dict | None = None,
                   passes: str | list | None = None, target: str = "native",
                   submodules: list[str] | None = None, dump_dir: str | os.PathLike | None = None,
                   **options: Any) -> nn.Module:
    """Compile `model` into a low-bit drop-in module (see README for every option)."""
    example_inputs = check_inputs(model, example_inputs)
    _check_options(bits, avg_bits, budget_bytes, scheme, rules, target, options)
    _check_finite_weights(model)
    dump_dir = dump_dir or os.environ.get("FXQUANT_DUMP") or None
    pipeline = Pipeline.coerce(passes if passes is not None else default_pipeline(target))
    config = {"bits": bits, "avg_bits": avg_bits, "budget_bytes": budget_bytes, "scheme": scheme,
              "rules": rules, "target": target, **options}
    calib = _materialize_calibration(calibration, options.get("max_calibration", 64))
    if submodules:
        return _compile_submodules(model, example_inputs, submodules, calib, pipeline, config, dump_dir)
    return _compile_graph(model, example_inputs, calib, pipeline, config, dump_dir)


def _compile_graph(model, example_inputs, calibration, pipeline, config, dump_dir, name="") -> CompiledModule:
    gm = capture(model, example_inputs, method=config.get("capture_method", "auto"))
    ctx = PassContext(example_inputs=example_inputs, calibration=calibration or [example_inputs],
                      config=config, progress=config.get("progress", sys.stderr.isatty()), model=model)
    sub_dir = None if dump_dir is None else (os.path.join(dump_dir, name) if name else dump_dir)
    pm = PassManager(pipeline, dump_dir=sub_dir, dump_mode=config.get("dump_mode", "all"))
    with eval_mode(model):
        gm = pm.run(gm, ctx)
    return CompiledModule(gm, pipeline=str(pipeline), timings=pm.timings, config=config,
                          signature=_signature(model), name=name, fp32_bytes=tensor_bytes(model),
                          example_inputs=example_inputs)


def _signature(model: nn.Module):
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _check_options(bits, avg_bits, budget_bytes, scheme, rules, target, options) -> None:
    unknown = sorted(set(options) - set(EXTRA_OPTIONS))
    if unknown:
        valid = ["bits", "avg_bits", "budget_bytes", "scheme", "calibration", "rules", "passes", "target",
                 "submodules", "dump_dir", *EXTRA_OPTIONS]
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        raise ConfigError(f"unknown option {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; valid options: {', '.join(valid)}")
    if bits is not None and bits not in VALID_BITS:
        raise ConfigError(f"bits must be one of {VALID_BITS}, got {bits!r}")
    given = [k for k, v in (("bits", bits), ("avg_bits", avg_bits), ("budget_bytes", budget_bytes)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give one of bits, avg_bits or budget_bytes, not {' and '.join(given)}")
    if avg_bits is not None and not (isinstance(avg_bits, (int, float)) and 1 < avg_bits <= 32):
        raise ConfigError(f"avg_bits must be a number in (1, 32], got {avg_bits!r}")
    if budget_bytes is not None and not (isinstance(budget_bytes, int) and budget_bytes > 0):
        raise ConfigError(f"budget_bytes must be a positive integer, got {budget_bytes!r}")
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if rules is not None and not isinstance(rules, dict):
        raise ConfigError(f"rules must be a dict {{pattern: bits or {{...}}}}, got {type(rules).__name__}")
    if not isinstance(target, str):
        raise ConfigError(f"target must be a string such as 'native', 'avx512', 'avx2', 'portable' or "
                          f"'reference', got {target!r}")


def _check_finite_weights(model: nn.Module) -> None:
    tensors = [(n, t, torch.isfinite) for n, t in model.named_parameters()] + \
              [(n, t, lambda v: ~torch.isnan(v)) for n, t in model.named_buffers()]  # buffers may hold -inf masks
    for name, t, ok in tensors:
        if t.is_floating_point() and t.numel() and not ok(t).all():
            bad = int((~ok(t)).sum())
            raise ConfigError(f"{name} has {bad} NaN/Inf values; fix or re-train the model before compiling "
                              f"(quantization scales would be undefined)")


def _as_tuple(item: Any) -> tuple:
    if isinstance(item, torch.Tensor):
        return (item,)
    if isinstance(item, (list, tuple)):
        return tuple(item)
    raise ConfigError(f"calibration items must be tensors or tuples of tensors, got {type(item).__name__}")


def _materialize_calibration(calibration: Iterable | None, limit: int) -> list[tuple] | None:
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        raise ConfigError("calibration must be an iterable of input tuples (e.g. a list or DataLoader), "
                          "not a single tensor; wrap it as [(tensor,)]")
    items = []
    for item in calibration:
        items.append(_as_tuple(item))
        if len(items) >= limit:
            break
    if not items:
        raise ConfigError("calibration is empty; give at least one input tuple, or None to use example_inputs")
    return items


# -- submodules: compile chosen parts, keep the model's own Python (decode loops, streaming) --------
def _select_submodules(model: nn.Module, patterns: list[str]) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    for pat in patterns:
        hits = [n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)]
        if not hits:
            top = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"submodules pattern {pat!r} matches no module; top-level modules are: "
                              f"{', '.join(top)}")
        chosen.extend(hits)
    return [n for n in dict.fromkeys(chosen)  # outermost wins when nested names both match
            if not any(n.startswith(o + ".") for o in chosen if o != n)]


def _record_calls(model: nn.Module, names: list[str], inputs: list[tuple], limit: int) -> dict[str, list[tuple]]:
    calls: dict[str, list[tuple]] = {n: [] for n in names}
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        sig = _signature(mod)

        def hook(module, args, kwargs, name=name, sig=sig):
            if len(calls[name]) < limit:
                if kwargs:
                    if sig is None:
                        raise ConfigError(f"submodule {name!r} is called with keyword arguments; "
                                          f"compile a module called positionally")
                    bound = sig.bind(*args, **kwargs)
                    args = tuple(bound.arguments.values())
                calls[name].append(tuple(args))

        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), eval_mode(model):
            for inp in inputs:
                model(*inp)
    finally:
        for h in handles:
            h.remove()
    return calls


def _compile_submodules(model, example_inputs, patterns, calibration, pipeline, config, dump_dir):
    names = _select_submodules(model, patterns)
    limit = config.get("max_calibration", 64)
    examples = _record_calls(model, names, [example_inputs], 1)
    calib = _record_calls(model, names, calibration, limit) if calibration else examples
    result = copy.deepcopy(model)
    compiled = {}
    for name in names:
        if not examples[name]:
            raise ConfigError(f"submodule {name!r} was not called when running the model on example_inputs, "
                              f"so it has no example inputs; choose modules the forward pass uses")
        sub = result.get_submodule(name)
        cm = _compile_graph(sub, examples[name][0], calib[name] or examples[name], pipeline, config,
                            dump_dir, name=name)
        parent, _, attr = name.rpartition(".")
        setattr(result.get_submodule(parent) if parent else result, attr, cm)
        compiled[name] = cm
    return CompiledSubmodules(result, compiled, fp32_bytes=tensor_bytes(model))
