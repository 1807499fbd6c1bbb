"""Typed pass contracts: analyses a pass requires and provides, cached and invalidated by the pass manager.

In the style of LLVM's / MLIR's analysis manager. An analysis is a typed result class (a subclass of
`Analysis`) named after what it holds, not a string key. A pass declares, when it registers,

    requires=(PackedWeights,)      analyses that must be available before it runs,
    provides=(PackedWeights,)      analyses it computes (it must `ctx.analyses.set(...)` each),
    preserves=(CalibrationData,)   for a transform: analyses still valid after it changed the graph.

The pass manager checks a pipeline before running it (every requirement is provided by an earlier
step or already available), and after each pass invalidates every analysis the pass did not preserve
when the pass changed the graph. Analysis passes only write meta, so they preserve everything. A
transform without declarations (e.g. a plugin written before contracts) preserves nothing.
An analysis class with a `compute` classmethod is computed on demand (cached) instead of by a pass.

Example:
    >>> am = AnalysisManager()
    >>> _ = am.set(PrecisionPlan(avg_bits=4.0, bytes=96, params=192))
    >>> am.get(PrecisionPlan, needed_by="quantize").avg_bits
    4.0
    >>> am.invalidate(by="fold-bn", preserved=())
    ['PrecisionPlan']
    >>> am.get(PrecisionPlan, needed_by="quantize")
    Traceback (most recent call last):
    ...
    fxquant.errors.ConfigError: pass 'quantize' needs PrecisionPlan (one QuantDecision per quantizable \
node), computed by pass 'assign-precision', but transform pass 'fold-bn' changed the graph after it and \
invalidated it; run 'fold-bn' before 'assign-precision' in the pipeline string, or run \
'assign-precision' again after 'fold-bn'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

from .errors import ConfigError


class Analysis:
    """Base of every typed analysis result.

    provider: the pass that computes it (named in errors); about: what it holds, in a few words;
    always_valid: survives every graph change (e.g. a cache keyed by tensor identity).
    """

    provider: ClassVar[str] = ""
    about: ClassVar[str] = ""
    always_valid: ClassVar[bool] = False

    @classmethod
    def compute(cls, gm: Any, ctx: Any) -> "Analysis | None":
        """Compute the analysis on demand; None (the default) means only its provider pass makes it."""
        return None


@dataclass
class CalibrationData(Analysis):
    """Calibration data besides the per-node statistics in meta[ir.ACT_STATS].

    samples: node name -> a slice of the first batch's input (quantize measures SQNR on it);
    io_stats: placeholder name or "output:<i>" -> {min, max, absmax, percentile, pct} (lower's io q/dq).
    """

    provider: ClassVar[str] = "calibrate"
    about: ClassVar[str] = "calibration samples and graph input/output ranges"
    samples: dict = field(default_factory=dict)
    io_stats: dict = field(default_factory=dict)
    batches: int = 0


@dataclass
class SensitivityTable(Analysis):
    """Per node name, {decision label: model-output error}; metric is "mse" / "kl" (None when skipped)."""

    provider: ClassVar[str] = "sensitivity"
    about: ClassVar[str] = "per-candidate output errors"
    metric: str | None = None
    errors: dict = field(default_factory=dict)


@dataclass
class PrecisionPlan(Analysis):
    """The decided formats: node name -> QuantDecision (also in meta[ir.DECISION]) and the totals."""

    provider: ClassVar[str] = "assign-precision"
    about: ClassVar[str] = "one QuantDecision per quantizable node"
    avg_bits: float = 32.0
    bytes: int = 0
    params: int = 0
    decisions: dict = field(default_factory=dict)


@dataclass
class PackedWeights(Analysis):
    """node name -> QuantizedWeight of every decided (non-float) quantizable node."""

    provider: ClassVar[str] = "quantize"
    about: ClassVar[str] = "the packed QuantizedWeight of every decided node"
    weights: dict = field(default_factory=dict)


def describe(kind: type[Analysis]) -> str:
    return f"{kind.__name__} ({kind.about})" if kind.about else kind.__name__


class AnalysisManager:
    """The analyses of one compile: cached by type, invalidated by graph changes, errors naming the fix."""

    def __init__(self) -> None:
        self._results: dict[type, Analysis] = {}
        self._invalidated_by: dict[type, str] = {}

    def set(self, result: Analysis) -> Analysis:
        """Store a pass's result (replacing an older one of the same type)."""
        if not isinstance(result, Analysis):
            raise TypeError(f"analyses must be Analysis instances, got {type(result).__name__}")
        self._results[type(result)] = result
        self._invalidated_by.pop(type(result), None)
        return result

    def cached(self, kind: type[Analysis]) -> Analysis | None:
        """The stored result, or None (never computes)."""
        return self._results.get(kind)

    def get(self, kind: type[Analysis], needed_by: str = "", gm: Any = None, ctx: Any = None) -> Any:
        """The stored result, else computed on demand when the class can, else a ConfigError with the fix."""
        found = self._results.get(kind)
        if found is None:
            found = kind.compute(gm, ctx)
            if found is None:
                raise ConfigError(missing_message(kind, needed_by, self._invalidated_by.get(kind)))
            self.set(found)
        return found

    def available(self) -> set[type]:
        return set(self._results)

    def invalidate(self, by: str, preserved: Iterable[type] | str = ()) -> list[str]:
        """Drop every analysis not in `preserved` ("all" keeps all) after pass `by` changed the graph."""
        if preserved == "all":
            return []
        keep = set(preserved)
        dropped = [k for k in self._results if k not in keep and not k.always_valid]
        for kind in dropped:
            del self._results[kind]
            self._invalidated_by[kind] = by
        return sorted(k.__name__ for k in dropped)


def missing_message(kind: type[Analysis], needed_by: str, invalidated_by: str | None = None) -> str:
    who = f"pass {needed_by!r}" if needed_by else "this pass"
    provider = kind.provider or "<no pass>"
    head = f"{who} needs {describe(kind)}, computed by pass {provider!r}, but "
    if invalidated_by:
        return (
            head + f"transform pass {invalidated_by!r} changed the graph after it and invalidated it; run "
            f"{invalidated_by!r} before {provider!r} in the pipeline string, or run {provider!r} again after "
            f"{invalidated_by!r}"
        )
    where = f"before {needed_by!r}" if needed_by else "before it"
    return head + f"{provider!r} has not run; add {provider!r} {where} in the pipeline string"


@dataclass(frozen=True)
class Contract:
    """What a registered pass declares: its kind and the analyses it requires, provides and preserves."""

    kind: str = "transform"
    requires: tuple[type, ...] = ()
    provides: tuple[type, ...] = ()
    preserves: tuple[type, ...] | str | None = None  # None: transforms preserve nothing, analyses all

    @property
    def preserved(self) -> tuple[type, ...] | str:
        if self.kind == "analysis" or self.preserves == "all":
            return "all"
        return tuple(self.preserves or ()) + tuple(self.provides)


def check_contract_types(name: str, requires: Iterable, provides: Iterable, preserves: Any) -> None:
    """register_pass's check of the declarations: Analysis subclasses, "all" or None for preserves."""
    items = [("requires", r) for r in requires] + [("provides", p) for p in provides]
    if preserves not in (None, "all"):
        items += [("preserves", p) for p in preserves]
    for what, kind in items:
        if not (isinstance(kind, type) and issubclass(kind, Analysis)):
            raise TypeError(
                f"register_pass({name!r}): {what} must list Analysis subclasses "
                f"(fxquant.analysis), got {kind!r}"
            )


def check_pipeline(steps: list[tuple[str, Contract]], available: Iterable[type] = ()) -> None:
    """ConfigError when a step requires an analysis no earlier step provides (and none is available).

    steps: (pass name, contract) in pipeline order; available: analyses already computed (a second
    pipeline run on the same PassContext). Invalidation is checked while running, when it is known
    whether a transform changed the graph.
    """
    have = set(available)
    names = [n for n, _ in steps]
    for index, (name, contract) in enumerate(steps):
        for kind in contract.requires:
            if kind not in have and not _computable(kind):
                fixed = names[:index] + [kind.provider] + names[index:]
                raise ConfigError(
                    f"pipeline '{','.join(names)}': pass {name!r} (step {index + 1}) needs {describe(kind)}, "
                    f"which pass {kind.provider!r} provides, and no step before it runs {kind.provider!r}. "
                    f"Add it before {name!r}, e.g. '{','.join(fixed)}' (its own prerequisites may be "
                    f"needed too)"
                )
        have |= set(contract.provides)


def _computable(kind: type[Analysis]) -> bool:
    return getattr(kind.compute, "__func__", None) is not Analysis.compute.__func__
