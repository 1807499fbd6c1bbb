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
from .formats import scheme_options
from .memory import trim_heap
from .passmanager import PassManager
from .pipeline import Pipeline
from .registry import PassContext
from .rules import MIN_BITS_CHOICES, asks_for_gptq
from .runtime import CompiledModule, CompiledSubmodules, tensor_bytes, unquantized_weight_warning

HYGIENE = "cleanup,fold-bn,const-fold,linearize,propagate-shapes"
QUANTIZE = (
    "calibrate,sensitivity,assign-precision,quantize,tie-embeddings,lower,merge-siblings,fuse-layernorm,"
    "fuse-residual,lower-attention"
)
BOUNDARY = "int8-kv-inputs"   # last: it changes what the module takes (after codegen and its timing runs)
VALID_BITS = (8, 4, 3, 2)
EXTRA_OPTIONS = {
    "group_size": "group size along K for per-group formats (default 64; 32/64/128)",
    "act_bits": "8 (dynamic per-token int8, default) or None (float activations)",
    "min_bits": "under a budget, the smallest weight width the solver may pick (default 2)",
    "kv_bits": "8 (attention keys/values that are constant graph inputs kept as per-row int8, default) "
    "or None "
    "(float32)",
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


def default_pipeline(target: str = "native", full_h: bool = True) -> str:
    """The pipeline compile_lowbit runs when `passes` is None. full_h=False calibrates only diag(H):
    compile_lowbit asks for that unless GPTQ rounding reads H (six Linear(4096, 4096) kept 768 MiB of
    float64 H otherwise)."""
    quantize = QUANTIZE if full_h else QUANTIZE.replace("calibrate,", "calibrate{full_h=False},", 1)
    if target == "reference":
        return f"{HYGIENE},{quantize},{BOUNDARY}"
    suffix = "codegen" if target == "native" else f"codegen{{target={target}}}"
    return f"{HYGIENE},{quantize},{suffix},{BOUNDARY}"


def compile_lowbit(
    model: nn.Module,
    example_inputs: Any,
    bits: int | None = None,
    avg_bits: float | None = None,
    budget_bytes: int | None = None,
    scheme: str = "auto",
    calibration: Iterable | None = None,
    rules: dict | None = None,
    passes: str | list | None = None,
    target: str = "native",
    submodules: list[str] | None = None,
    dump_dir: str | os.PathLike | None = None,
    **options: Any,
) -> nn.Module:
    """Compile `model` into a low-bit drop-in module (see README for every option)."""
    example_inputs = check_inputs(model, example_inputs)
    _check_options(bits, avg_bits, budget_bytes, scheme, rules, target, options)
    _check_finite_weights(model)
    target = _fallback_target(target, options)
    dump_dir = dump_dir or os.environ.get("FXQUANT_DUMP") or None
    config = {
        "bits": bits,
        "avg_bits": avg_bits,
        "budget_bytes": budget_bytes,
        "scheme": scheme,
        "rules": rules,
        "target": target,
        **options,
    }
    pipeline = Pipeline.coerce(
        passes if passes is not None
        else _with_fallback(default_pipeline(target, full_h=asks_for_gptq(config)), options)
    )
    calib = _materialize_calibration(calibration, options.get("max_calibration", 64))
    if submodules:
        result = _compile_submodules(model, example_inputs, submodules, calib, pipeline, config, dump_dir)
    else:
        result = _compile_graph(model, example_inputs, calib, pipeline, config, dump_dir)
    trim_heap()  # give the compile's freed temporaries (calibration statistics, candidates) back to the OS
    return result


def _compile_graph(model, example_inputs, calibration, pipeline, config, dump_dir, name="") -> CompiledModule:
    gm = capture(model, example_inputs, method=config.get("capture_method", "auto"))
    ctx = PassContext(
        example_inputs=example_inputs,
        calibration=calibration or [example_inputs],
        config=config,
        progress=config.get("progress", sys.stderr.isatty()),
        model=model,
    )
    sub_dir = None if dump_dir is None else (os.path.join(dump_dir, name) if name else dump_dir)
    pm = PassManager(pipeline, dump_dir=sub_dir, dump_mode=config.get("dump_mode", "all"))
    with eval_mode(model):
        gm = pm.run(gm, ctx)
    cm = CompiledModule(
        gm,
        pipeline=str(pipeline),
        timings=pm.timings,
        config=config,
        signature=_signature(model),
        name=name,
        fp32_bytes=tensor_bytes(model),
        example_inputs=example_inputs,
    )
    kept = unquantized_weight_warning(cm.report_rows())
    if kept:
        import warnings

        warnings.warn(f"compile_lowbit{f' ({name})' if name else ''}: {kept}", stacklevel=3)
    return cm


def _signature(model: nn.Module):
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _check_options(bits, avg_bits, budget_bytes, scheme, rules, target, options) -> None:
    unknown = sorted(set(options) - set(EXTRA_OPTIONS))
    if unknown:
        valid = [
            "bits",
            "avg_bits",
            "budget_bytes",
            "scheme",
            "calibration",
            "rules",
            "passes",
            "target",
            "submodules",
            "dump_dir",
            *EXTRA_OPTIONS,
        ]
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        raise ConfigError(
            f"unknown option {unknown[0]!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; valid options: {', '.join(valid)}"
        )
    if bits is not None and bits not in VALID_BITS:
        raise ConfigError(f"bits must be one of {VALID_BITS}, got {bits!r}")
    given = [
        k
        for k, v in (("bits", bits), ("avg_bits", avg_bits), ("budget_bytes", budget_bytes))
        if v is not None
    ]
    if len(given) > 1:
        raise ConfigError(f"give one of bits, avg_bits or budget_bytes, not {' and '.join(given)}")
    if avg_bits is not None and not (isinstance(avg_bits, (int, float)) and 1 < avg_bits <= 32):
        raise ConfigError(f"avg_bits must be a number in (1, 32], got {avg_bits!r}")
    if budget_bytes is not None and not (isinstance(budget_bytes, int) and budget_bytes > 0):
        raise ConfigError(f"budget_bytes must be a positive integer, got {budget_bytes!r}")
    if scheme not in scheme_options():
        raise ConfigError(f"scheme must be one of {scheme_options()}, got {scheme!r}")
    if rules is not None and not isinstance(rules, dict):
        raise ConfigError(f"rules must be a dict {{pattern: bits or {{...}}}}, got {type(rules).__name__}")
    if not isinstance(target, str):
        raise ConfigError(
            f"target must be a string such as 'native', 'avx512', 'avx2', 'portable' or "
            f"'reference', got {target!r}"
        )
    from .codegen.targets import target_names

    if target not in target_names():
        raise ConfigError(f"target must be one of {target_names()}, got {target!r}")
    if rules is not None:
        from .rules import parse_rules

        parse_rules(rules)  # structure and values now; matching against module names after capture
    for key, (ok, want) in OPTION_CHECKS.items():
        if key in options and not ok(options[key]):
            raise ConfigError(f"{key} must be {want}, got {options[key]!r}")


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 24


OPTION_CHECKS = {
    "group_size": (_positive_int, "a positive integer (e.g. 32, 64, 128)"),
    "act_bits": (lambda v: v in (8, None) and not isinstance(v, bool), "8 or None"),
    "kv_bits": (lambda v: v in (8, None) and not isinstance(v, bool), "8 or None"),
    "min_bits": (lambda v: v in MIN_BITS_CHOICES and not isinstance(v, bool),
                 "one of " + ", ".join(map(str, MIN_BITS_CHOICES))),
    "act_mode": (lambda v: v in ("dynamic", "static"), "'dynamic' or 'static'"),
    "symmetric": (_is_bool, "True or False"),
    "gptq": (_is_bool, "True or False"),
    "fallback": (_is_bool, "True or False"),
    "progress": (_is_bool, "True or False"),
    "tie_siblings": (_is_bool, "True or False"),
    "dump_mode": (lambda v: v in ("all", "changed", "failure"), "'all', 'changed' or 'failure'"),
    "capture_method": (lambda v: v in ("auto", "export", "symbolic"), "'auto', 'export' or 'symbolic'"),
    "max_calibration": (_positive_int, "a positive integer"),
    "depthwise_bits": (
        lambda v: v is None or (v in VALID_BITS and not isinstance(v, bool)),
        f"None or one of {VALID_BITS}",
    ),
}


def _fallback_target(target: str, options: dict) -> str:
    """fallback=True without a C compiler: compile for the reference path, with a warning."""
    if target == "reference" or not options.get("fallback"):
        return target
    from .codegen.build import BuildError, find_compiler

    try:
        find_compiler()
    except BuildError as exc:
        import warnings

        warnings.warn(
            f"fallback=True: {exc} Compiling for target='reference' (the PyTorch reference path, "
            f"no generated kernels) instead.",
            stacklevel=3,
        )
        return "reference"
    return target


def _with_fallback(pipeline: str, options: dict) -> str:
    """The default pipeline with codegen{fallback=true} when fallback=True (ops a target cannot serve)."""
    if not options.get("fallback"):
        return pipeline
    steps = Pipeline.parse(pipeline).steps
    for step in steps:
        if step.name == "codegen":
            step.raw_options["fallback"] = "true"
    return ",".join(str(step) for step in steps)


def _check_finite_weights(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "cpu":
            raise ConfigError(
                f"{name} is on device {t.device}; fxquant compiles CPU models: load real weights "
                f"on the CPU (model.to('cpu'), or load_state_dict(..., assign=True) for a meta model)"
            )
    for name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        if (
            isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d))
            and isinstance(weight, torch.Tensor)
            and weight.numel() == 0
        ):
            raise ConfigError(
                f"module {name!r} ({type(mod).__name__}) has an empty weight of shape "
                f"{tuple(weight.shape)}; a layer with no inputs or outputs cannot be quantized: "
                f"remove it from the model"
            )
    tensors = [(n, t, torch.isfinite) for n, t in model.named_parameters()] + [
        (n, t, lambda v: ~torch.isnan(v)) for n, t in model.named_buffers()
    ]  # buffers may hold -inf masks
    for name, t, ok in tensors:
        if t.is_floating_point() and t.numel() and not ok(t).all():
            bad = int((~ok(t)).sum())
            raise ConfigError(
                f"{name} has {bad} NaN/Inf values; fix or re-train the model before compiling "
                f"(quantization scales would be undefined)"
            )


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
        raise ConfigError(
            "calibration must be an iterable of input tuples (e.g. a list or DataLoader), "
            "not a single tensor; wrap it as [(tensor,)]"
        )
    items = []
    for item in calibration:
        items.append(_as_tuple(item))
        if len(items) >= limit:
            break
    if not items:
        raise ConfigError(
            "calibration is empty; give at least one input tuple, or None to use example_inputs"
        )
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
            raise ConfigError(
                f"submodules pattern {pat!r} matches no module; top-level modules are: {', '.join(top)}"
            )
        chosen.extend(hits)
    return [
        n
        for n in dict.fromkeys(chosen)  # outermost wins when nested names both match
        if not any(n.startswith(o + ".") for o in chosen if o != n)
    ]


def _record_calls(
    model: nn.Module, names: list[str], inputs: list[tuple], limit: int
) -> dict[str, list[tuple]]:
    calls: dict[str, list[tuple]] = {n: [] for n in names}
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        sig = _signature(mod)

        def hook(module, args, kwargs, name=name, sig=sig):
            if len(calls[name]) < limit:
                if kwargs:
                    if sig is None:
                        raise ConfigError(
                            f"submodule {name!r} is called with keyword arguments; "
                            f"compile a module called positionally"
                        )
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
            raise ConfigError(
                f"submodule {name!r} was not called when running the model on example_inputs, "
                f"so it has no example inputs; choose modules the forward pass uses"
            )
        sub = result.get_submodule(name)
        cm = _compile_graph(
            sub, examples[name][0], calib[name] or examples[name], pipeline, config, dump_dir, name=name
        )
        parent, _, attr = name.rpartition(".")
        setattr(result.get_submodule(parent) if parent else result, attr, cm)
        compiled[name] = cm
    return CompiledSubmodules(result, compiled, fp32_bytes=tensor_bytes(model))
