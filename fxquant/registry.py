"""Pass registry: `@register_pass`, built-in passes loaded lazily, plugins from entry points.

A pass is a function `(gm, ctx) -> PassResult`. Its options are a dataclass; the instance for the
current pipeline step is `ctx.options`. Its contract (fxquant/analysis.py) names the typed analyses
it requires, provides and preserves; passes hand data to each other only through the graph, its
meta and `ctx.analyses`.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Opts:
    ...     threshold: float = 0.5
    >>> @register_pass("my-pass", options=Opts, kind="analysis")
    ... def my_pass(gm, ctx):
    ...     return PassResult(changed=False, message=f"threshold={ctx.options.threshold}")
    >>> from fxquant.analysis import PackedWeights
    >>> @register_pass("my-reader", kind="analysis", requires=(PackedWeights,))
    ... def my_reader(gm, ctx):
    ...     packed = ctx.analyses.get(PackedWeights, needed_by="my-reader")
    ...     return PassResult(message=f"{len(packed.weights)} packed weights")
    >>> get_pass("my-reader").contract.requires
    (<class 'fxquant.analysis.PackedWeights'>,)
    >>> unregister_pass("my-pass"), unregister_pass("my-reader")
    (None, None)

Plugins: another distribution declares an entry point in the group ``fxquant.passes``
(``name = "pkg.module"`` or ``"pkg.module:function"``). The loaded module must set
``FXQUANT_API_VERSION`` (or the function be registered with ``api_version=``) equal to
`API_VERSION`; a mismatch raises `PluginError`.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .analysis import AnalysisManager, Contract, check_contract_types
from .errors import ConfigError, PipelineError, PluginError

API_VERSION = 1
ENTRY_POINT_GROUP = "fxquant.passes"
PASS_KINDS = ("analysis", "transform")


@dataclass
class PassResult:
    """What a pass reports: whether it changed the graph, a one-line summary, an optional new gm."""

    changed: bool = False
    message: str = ""
    graph_module: Any = None


@dataclass
class PassContext:
    """Everything a pass may read besides the graph.

    config holds compile_lowbit's options (bits, avg_bits, budget_bytes, scheme, rules, target...);
    analyses holds the typed results passes hand on (fxquant.analysis: CalibrationData, PackedWeights, ...);
    state is free-form scratch space kept for plugins written before typed analyses (no built-in pass
    uses it).
    """

    example_inputs: tuple = ()
    calibration: Any = None
    config: dict = field(default_factory=dict)
    options: Any = None
    dump_dir: Path | None = None
    work_dir: Path | None = None
    state: dict = field(default_factory=dict)
    progress: bool = False
    model: Any = None
    analyses: AnalysisManager = field(default_factory=AnalysisManager)


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable
    options: type | None
    kind: str
    description: str
    api_version: int
    origin: str
    contract: Contract = Contract()


_REGISTRY: dict[str, PassInfo] = {}
_LOADED = False
_LOADING = False


def register_pass(
    name: str,
    options: type | None = None,
    kind: str = "transform",
    api_version: int = API_VERSION,
    description: str | None = None,
    requires: tuple = (),
    provides: tuple = (),
    preserves: tuple | str | None = None,
) -> Callable:
    """Decorator registering `fn(gm, ctx) -> PassResult` under `name`.

    requires / provides / preserves: Analysis subclasses (fxquant.analysis); preserves="all" for a
    transform that keeps every analysis valid. Without declarations a transform preserves nothing.
    """
    if kind not in PASS_KINDS:
        raise ValueError(f"register_pass({name!r}): kind must be one of {PASS_KINDS}, got {kind!r}")
    if options is not None and not dataclasses.is_dataclass(options):
        raise TypeError(f"register_pass({name!r}): options must be a dataclass type, got {options!r}")
    check_contract_types(name, requires, provides, preserves)
    contract = Contract(
        kind, tuple(requires), tuple(provides), preserves if preserves in (None, "all") else tuple(preserves)
    )

    def decorate(fn: Callable) -> Callable:
        origin = "builtin" if fn.__module__.startswith("fxquant.") else f"plugin:{fn.__module__}"
        module = inspect.getmodule(fn)
        declared = getattr(module, "FXQUANT_API_VERSION", api_version)
        if api_version != API_VERSION or declared != API_VERSION:
            raise PluginError(
                f"pass {name!r} from {fn.__module__} was written for fxquant pass API "
                f"{declared if declared != API_VERSION else api_version}, but this fxquant provides API "
                f"{API_VERSION}; update the plugin (or install a matching fxquant)"
            )
        old = _REGISTRY.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise PipelineError(
                f"pass name {name!r} is already registered by {old.fn.__module__}; "
                f"choose another name for {fn.__module__}.{fn.__qualname__}"
            )
        doc = description or (inspect.getdoc(fn) or "").split("\n")[0]
        _REGISTRY[name] = PassInfo(name, fn, options, kind, doc, api_version, origin, contract)
        fn.fxquant_pass_name = name
        return fn

    return decorate


def _load_builtins() -> None:
    import fxquant.passes as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"fxquant.passes.{mod.name}")


def _load_plugins() -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin pass {ep.name!r} ({ep.value}) failed to import: "
                f"{type(exc).__name__}: {exc}; fix or uninstall that distribution"
            ) from exc
        module = obj if inspect.ismodule(obj) else inspect.getmodule(obj)
        declared = getattr(module, "FXQUANT_API_VERSION", None)
        registered = _REGISTRY.get(ep.name)
        if declared is None and (registered is None or registered.origin == "builtin"):
            raise PluginError(
                f"plugin {ep.value!r} must declare FXQUANT_API_VERSION = {API_VERSION} "
                f"and register pass {ep.name!r} with @fxquant.register_pass"
            )
        if declared is not None and declared != API_VERSION:
            raise PluginError(
                f"plugin {ep.value!r} was written for fxquant pass API {declared}, but this "
                f"fxquant provides API {API_VERSION}; update the plugin"
            )
        if ep.name not in _REGISTRY:
            raise PluginError(
                f"plugin entry point {ep.name!r} ({ep.value}) loaded but registered no pass "
                f"named {ep.name!r}; decorate the pass with @fxquant.register_pass({ep.name!r})"
            )


def ensure_loaded() -> None:
    """Import built-in passes and plugins once (first registry lookup)."""
    global _LOADED, _LOADING
    if _LOADED or _LOADING:
        return
    _LOADING = True
    try:
        _load_builtins()
        _load_plugins()
        _LOADED = True
    finally:
        _LOADING = False


def refresh() -> None:
    """Re-scan built-ins and entry points (after installing a plugin at run time)."""
    global _LOADED
    _LOADED = False
    ensure_loaded()


def unregister_pass(name: str) -> None:
    """Remove a pass from the registry (tests and interactive sessions)."""
    _REGISTRY.pop(name, None)


def available_passes() -> dict[str, PassInfo]:
    ensure_loaded()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> PassInfo:
    """Look a pass up by name; unknown names raise PipelineError listing the valid ones."""
    passes = available_passes()
    if name not in passes:
        import difflib

        close = difflib.get_close_matches(name, passes, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise PipelineError(f"unknown pass {name!r}.{hint} Valid passes: {', '.join(passes)}")
    return passes[name]


def calibration_batches(ctx, max_batches: int = 0) -> list[tuple]:
    """ctx.calibration as a list of input tuples (example inputs when None); ConfigError when empty."""
    data = ctx.calibration
    if data is None:
        if not ctx.example_inputs:
            raise ConfigError(
                "calibration: no calibration data and no example inputs; pass calibration=[(x,), ...]"
            )
        data = [tuple(ctx.example_inputs)]
    data = list(data)
    if not data:
        raise ConfigError(
            "calibration set is empty; pass calibration=[(x1,), (x2,), ...] (a list of input "
            "tuples), or calibration=None to calibrate on the example inputs"
        )
    batches = [item if isinstance(item, (tuple, list)) else (item,) for item in data]
    return [tuple(b) for b in (batches[:max_batches] if max_batches > 0 else batches)]
