"""Pipelines: parse/print pass lists, coerce options, and run them with instruments.

Text form: comma-separated pass names, each with optional `{key=value,...}` options:

    >>> p = Pipeline.parse("cleanup,fold-bn,propagate-shapes")
    >>> str(p)
    'cleanup,fold-bn,propagate-shapes'

`str(Pipeline.parse(text)) == text` for every valid text. Unknown passes, unknown options and
values of the wrong type raise PipelineError listing what is valid.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import PipelineError
from .registry import PassInfo, get_pass


@dataclass
class PassSpec:
    """One pipeline step: a pass name and its options as raw text (kept for round-tripping)."""

    name: str
    raw_options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.raw_options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.raw_options.items()) + "}"

    @property
    def info(self) -> PassInfo:
        return get_pass(self.name)

    def build_options(self) -> Any:
        """The pass's options dataclass filled from raw_options (validated)."""
        info = self.info
        if info.options is None:
            if self.raw_options:
                raise PipelineError(f"pass {self.name!r} takes no options, got {sorted(self.raw_options)}")
            return None
        hints = typing.get_type_hints(info.options)
        fields = {f.name: f for f in dataclasses.fields(info.options)}
        values = {}
        for key, raw in self.raw_options.items():
            if key not in fields:
                valid = ", ".join(f"{n}: {_type_name(hints[n])}" for n in fields)
                raise PipelineError(f"pass {self.name!r} has no option {key!r}; valid options: {valid}")
            values[key] = _coerce(self.name, key, raw, hints[key])
        return info.options(**values)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(pass_name: str, key: str, raw: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if raw in ("None", "none", None):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(pass_name, key, raw, arg)
            except PipelineError as exc:
                errors.append(str(exc))
        raise PipelineError(errors[-1] if errors else f"bad value for {pass_name}.{key}")
    if origin is typing.Literal:
        if raw not in args:
            raise PipelineError(f"option {pass_name}.{key} must be one of {list(args)}, got {raw!r}")
        return raw
    if not isinstance(raw, str):
        if tp is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, tp) and not (tp is int and isinstance(raw, bool)):
            return raw
        raise PipelineError(f"option {pass_name}.{key} expects {_type_name(tp)}, got {raw!r}")
    try:
        if tp is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp in (int, float, str):
            return tp(raw)
    except ValueError:
        raise PipelineError(f"option {pass_name}.{key} expects {_type_name(tp)}, got {raw!r}") from None
    raise PipelineError(f"option {pass_name}.{key} has unsupported type {_type_name(tp)}")


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced '}}' in pipeline text {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise PipelineError(f"unbalanced '{{' in pipeline text {text!r}")
    parts.append("".join(cur))
    return parts


def _parse_step(item: str, text: str) -> PassSpec:
    item = item.strip()
    if not item:
        raise PipelineError(f"empty pass name in pipeline text {text!r} (stray comma?)")
    if "{" not in item:
        return PassSpec(item)
    if not item.endswith("}"):
        raise PipelineError(f"pass step {item!r} must look like name{{key=value,...}}")
    name, body = item[: item.index("{")].strip(), item[item.index("{") + 1 : -1]
    raw: dict[str, str] = {}
    for kv in filter(None, (s.strip() for s in body.split(","))):
        if "=" not in kv:
            raise PipelineError(f"option {kv!r} of pass {name!r} must be key=value")
        k, v = (s.strip() for s in kv.split("=", 1))
        if k in raw:
            raise PipelineError(f"option {k!r} given twice for pass {name!r}")
        raw[k] = v
    return PassSpec(name, raw)


class Pipeline:
    """An ordered list of PassSpec, validated against the registry on construction."""

    def __init__(self, steps: Iterable[PassSpec]):
        self.steps = list(steps)
        for step in self.steps:
            step.build_options()  # validates name, option names and types now, not mid-run

    @classmethod
    def parse(cls, text: str) -> "Pipeline":
        if not isinstance(text, str) or not text.strip():
            raise PipelineError("pipeline text is empty; give passes like 'cleanup,fold-bn'")
        return cls(_parse_step(item, text) for item in _split_top_level(text))

    @classmethod
    def coerce(cls, spec: "Pipeline | str | Iterable[Any]") -> "Pipeline":
        """Accept a Pipeline, text, or a list of names / (name, {options}) / PassSpec."""
        if isinstance(spec, Pipeline):
            return spec
        if isinstance(spec, str):
            return cls.parse(spec)
        steps = []
        for item in spec:
            if isinstance(item, PassSpec):
                steps.append(item)
            elif isinstance(item, str):
                steps.extend(cls.parse(item).steps)
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
                steps.append(PassSpec(item[0], {k: _format_value(v) for k, v in item[1].items()}))
            else:
                raise PipelineError(f"pipeline items must be names, (name, options) or PassSpec; "
                                    f"got {item!r}")
        return cls(steps)

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.steps)

    def __repr__(self) -> str:
        return f"Pipeline.parse({str(self)!r})"

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def names(self) -> list[str]:
        return [s.name for s in self.steps]


def _format_value(v: Any) -> str:
    return str(v)
