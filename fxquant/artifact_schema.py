"""The artifact manifest as untrusted data: typed checks with ranges, identifiers and enums.

Every value `fxquant.load` takes from manifest.json passes through one of these checks before it
reaches Python code generation (torch.fx), C code generation (the kernel templates), a path or an
allocation. A failed check raises ArtifactError naming the field (as a JSON path) and what it needs.
`save` runs the same checks on the manifest it writes, so what saves always loads.

Example:
    >>> ident("fc1_1", "graph.nodes[3].name")
    'fc1_1'
    >>> ident("x=__import__('os')", "graph.nodes[0].target")
    Traceback (most recent call last):
    ...
    fxquant.errors.ArtifactError: manifest.json graph.nodes[0].target: "x=__import__('os')" is not a \
valid identifier (letters, digits and _ only, not starting with a digit or __): tampered artifact
"""
from __future__ import annotations

import keyword
import math
import re
from typing import Any, Callable

import torch

from .errors import ArtifactError
from .formats import FORMATS

MAX_INT = (1 << 63) - 1             # any int in the manifest: an int64 (an open slice ends at its maximum)
MAX_DIM = 1 << 31                   # one tensor dimension
MAX_NUMEL = 1 << 34                 # elements of one stored tensor
MAX_TEXT = 4096                     # a free-text field (pipeline, provenance entry)
MAX_ITEMS = 1_000_000               # entries of any list or dict
MAX_DEPTH = 12                      # nesting of encoded arguments / config values

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}\Z")
_SEGMENT = re.compile(r"[A-Za-z0-9_+]{1,200}\Z")
_SOURCE = re.compile(r"[A-Za-z0-9_.\-<>]{1,200}:[0-9]{1,9}\Z")   # file.py:12, <stdin>:3, <ipython-input-1>:2
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")

DTYPES: dict[str, torch.dtype] = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool)}
TORCH_ENUMS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
               "preserve_format": torch.preserve_format, "strided": torch.strided}
DEVICES = ("cpu",)


def target_names() -> tuple[str, ...]:
    """The valid target names (the rows of fxquant.codegen.targets.TARGETS plus "native" and "reference")."""
    from .codegen.targets import target_names as names

    return names()


def fail(where: str, what: str) -> ArtifactError:
    """The error for a bad manifest field (raise the result)."""
    return ArtifactError(f"manifest.json {where}: {what}: tampered artifact")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------------------------ scalars
def want_type(value: Any, types: type | tuple, where: str) -> Any:
    """`value` if it is an instance of `types` (bool never passes as int)."""
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in (
        types if isinstance(types, tuple) else (types,)))
    if not ok:
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise fail(where, f"expected {names}, got {type(value).__name__} {_show(value)}")
    return value


def want_int(value: Any, where: str, lo: int = -MAX_INT - 1, hi: int = MAX_INT) -> int:
    want_type(value, int, where)
    if not lo <= value <= hi:
        raise fail(where, f"{value} is outside [{lo}, {hi}]")
    return value


def want_float(value: Any, where: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """A finite float (ints accepted) in [lo, hi]."""
    want_type(value, (int, float), where)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise fail(where, f"{_show(value)} is not a finite number in [{lo}, {hi}]")
    return float(value)


def want_enum(value: Any, choices: tuple | dict | set | frozenset, where: str) -> Any:
    if isinstance(value, (list, dict)) or value not in choices:
        shown = ", ".join(repr(c) for c in (list(choices)[:12]))
        raise fail(where, f"{_show(value)} is not one of {shown}")
    return value


def want_text(value: Any, where: str, limit: int = MAX_TEXT) -> str:
    """A printable one-line string (no control characters) of at most `limit` characters."""
    want_type(value, str, where)
    if len(value) > limit or not value.isprintable():
        raise fail(where, f"{_show(value)} is not a printable one-line text of <= {limit} characters")
    return value


def ident(value: Any, where: str) -> str:
    """A Python identifier that fx may paste into generated code (no dunder names, no keywords)."""
    if not (isinstance(value, str) and _IDENT.match(value) and not value.startswith("__")
            and not keyword.iskeyword(value)):
        raise fail(
            where,
            f"{_show(value)} is not a valid identifier (letters, digits and _ only, not starting "
            f"with a digit or __)",
        ).with_traceback(None)
    return value


def name_segment(value: Any, where: str) -> str:
    """A submodule name such as 'fc1_1', '0_1' or 'attn_query+key+value' (fx writes getattr(self, "0_1"))."""
    if not (isinstance(value, str) and _SEGMENT.match(value) and not value.startswith("__")):
        raise fail(where, f"{_show(value)} is not a module name (letters, digits, _ and + only)")
    return value


def dotted(value: Any, where: str, allow_empty: bool = False) -> str:
    """A dotted module path such as 'encoder.blocks.0.attn' (segments are identifiers or numbers)."""
    if allow_empty and value == "":
        return value
    want_type(value, str, where)
    parts = value.split(".")
    if len(value) > 1000 or not all(
        _SEGMENT.match(p) and not p.startswith("__") and not keyword.iskeyword(p) for p in parts
    ):
        raise fail(where, f"{_show(value)} is not a dotted name of identifiers")
    return value


def source_line(value: Any, where: str) -> str:
    if value == "":
        return value
    if not (isinstance(value, str) and _SOURCE.match(value)):
        raise fail(where, f"{_show(value)} is not a 'file.py:LINE' source location")
    return value


def sha256_hex(value: Any, where: str) -> str:
    if not (isinstance(value, str) and _SHA256.match(value)):
        raise fail(where, f"{_show(value)} is not a sha256 hex digest")
    return value


def want_dict(
    value: Any, where: str, required: tuple = (), optional: tuple = (), free_keys: bool = False
) -> dict:
    """A dict with the `required` keys, optionally the `optional` ones, and no others (unless free_keys)."""
    want_type(value, dict, where)
    missing = [k for k in required if k not in value]
    if missing:
        raise fail(where, f"lacks {missing[0]!r}")
    if not free_keys:
        extra = [k for k in value if k not in required and k not in optional]
        if extra:
            raise fail(where, f"has an unknown key {_show(extra[0])}")
    if len(value) > MAX_ITEMS:
        raise fail(where, "has too many entries")
    return value


def want_list(value: Any, where: str, limit: int = MAX_ITEMS) -> list:
    want_type(value, list, where)
    if len(value) > limit:
        raise fail(where, f"has {len(value)} items, more than {limit}")
    return value


def shape(value: Any, where: str, max_rank: int = 8) -> tuple[int, ...]:
    """A tensor shape: a list of at most `max_rank` dims in [0, 2^31) whose product is bounded."""
    dims = tuple(
        want_int(d, f"{where}[{i}]", 0, MAX_DIM - 1) for i, d in enumerate(want_list(value, where, max_rank))
    )
    if math.prod(dims) > MAX_NUMEL:
        raise fail(where, f"{list(dims)} has more than 2^34 elements")
    return dims


def dtype(value: Any, where: str) -> torch.dtype:
    return DTYPES[want_enum(value, DTYPES, where)]


# -------------------------------------------------------------------------------- plain JSON data
def json_data(value: Any, where: str, depth: int = 0) -> Any:
    """Display data (config, rules): scalars, bounded strings, lists and dicts of identifier-like keys."""
    if depth > MAX_DEPTH:
        raise fail(where, "is nested too deeply")
    if value is None or isinstance(value, (bool, int)):
        return want_int(value, where) if type(value) is int else value
    if isinstance(value, float):
        return want_float(value, where)
    if isinstance(value, str):
        return want_text(value, where, 10_000)
    if isinstance(value, list):
        return [
            json_data(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(want_list(value, where, 10_000))
        ]
    if isinstance(value, dict):
        for k in want_dict(value, where, free_keys=True):
            want_text(k, f"{where} key", 1000)
        return {k: json_data(v, f"{where}.{k}", depth + 1) for k, v in value.items()}
    raise fail(where, f"unsupported value {_show(value)}")


# ----------------------------------------------------------------- encoded fx arguments and meta
def decode_arg(value: Any, where: str, lookup: Callable[[str], Any], depth: int = 0) -> Any:
    """An fx argument encoded by artifact_files.encode_arg; `lookup(name)` returns an earlier node."""
    if depth > MAX_DEPTH:
        raise fail(where, "is nested too deeply")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return want_int(value, where)
    if isinstance(value, float):
        return want_float(value, where)
    if isinstance(value, str):
        return want_text(value, where, 1000)
    if isinstance(value, list):
        return [
            decode_arg(v, f"{where}[{i}]", lookup, depth + 1) for i, v in enumerate(want_list(value, where))
        ]
    want_type(value, dict, where)
    if len(value) != 1:
        raise fail(where, f"an encoded value has exactly one key, got {_show(sorted(value))}")
    ((kind, inner),) = value.items()
    if kind == "node":
        return lookup(ident(inner, f"{where}.node"))
    if kind == "tuple":
        return tuple(
            decode_arg(v, f"{where}.tuple[{i}]", lookup, depth + 1)
            for i, v in enumerate(want_list(inner, where))
        )
    if kind == "float":
        return float(want_enum(inner, ("nan", "inf", "-inf"), f"{where}.float"))
    if kind == "dtype":
        return dtype(inner, f"{where}.dtype")
    if kind == "device":
        return torch.device(want_enum(inner, DEVICES, f"{where}.device"))
    if kind == "torch":
        return TORCH_ENUMS[want_enum(inner, TORCH_ENUMS, f"{where}.torch")]
    raise fail(where, f"unknown encoded value kind {_show(kind)}")


DECISION_FIELDS = (
    "weight_bits",
    "scheme",
    "granularity",
    "group_size",
    "symmetric",
    "act_bits",
    "act_mode",
    "rounding",
    "decided_by",
)


def decision(value: Any, where: str) -> dict | None:
    """A QuantDecision's fields, each typed and from its enum."""
    if value is None:
        return None
    d = want_dict(value, where, required=DECISION_FIELDS)
    if d["weight_bits"] is not None:
        want_int(d["weight_bits"], f"{where}.weight_bits", 1, 32)
    want_enum(d["scheme"], tuple(FORMATS), f"{where}.scheme")
    want_enum(d["granularity"], ("tensor", "channel", "group"), f"{where}.granularity")
    if d["group_size"] is not None:
        want_int(d["group_size"], f"{where}.group_size", 1, MAX_DIM)
    want_type(d["symmetric"], bool, f"{where}.symmetric")
    if d["act_bits"] is not None:
        want_enum(d["act_bits"], (8,), f"{where}.act_bits")
    want_enum(d["act_mode"], ("dynamic", "static"), f"{where}.act_mode")
    want_enum(d["rounding"], ("nearest", "gptq"), f"{where}.rounding")
    want_text(d["decided_by"], f"{where}.decided_by", 1000)
    return dict(d)


META_KEYS = ("module", "module_type", "source", "provenance", "shape", "dtype", "decision", "quant_stats")


def node_meta(value: Any, where: str) -> dict:
    """The IR meta of one node (see fxquant.ir), validated field by field."""
    m = want_dict(value, where, required=META_KEYS)
    out = {
        "module": dotted(m["module"], f"{where}.module", allow_empty=True),
        "module_type": "" if m["module_type"] == "" else ident(m["module_type"], f"{where}.module_type"),
        "source": source_line(m["source"], f"{where}.source"),
        "provenance": tuple(
            want_text(p, f"{where}.provenance[{i}]", 1000)
            for i, p in enumerate(want_list(m["provenance"], f"{where}.provenance", 256))
        ),
        "shape": None if m["shape"] is None else shape(m["shape"], f"{where}.shape", 16),
        "dtype": None if m["dtype"] is None else ident(m["dtype"], f"{where}.dtype"),
        "decision": decision(m["decision"], f"{where}.decision"),
        "quant_stats": {},
    }
    for k, v in want_dict(m["quant_stats"], f"{where}.quant_stats", free_keys=True).items():
        ident(k, f"{where}.quant_stats key")
        out["quant_stats"][k] = (
            v
            if v is None
            else want_float(v, f"{where}.quant_stats.{k}")
            if not isinstance(v, str)
            else want_text(v, f"{where}.quant_stats.{k}", 200)
        )
    return out


# ------------------------------------------------------------------------------- call-time inputs
INPUT_FORMATS = ("int8-rows", "row-scales")


def input_specs(value: Any, where: str) -> list[dict]:
    """Per input: {"name", "kind": "tensor", "dtype", "shape": [int | None], "format"?} or {"name", "kind":
    "none"}; format (pass int8-kv-inputs) marks the codes / scales of an input taken as int8 rows."""
    out = []
    for i, spec in enumerate(want_list(value, where, 4096)):
        w = f"{where}[{i}]"
        kind = want_enum(
            want_dict(spec, w, required=("name", "kind"),
                      optional=("dtype", "shape", "example", "format"))["kind"],
            ("tensor", "none", "int", "float", "bool", "any"),
            f"{w}.kind",
        )
        item = {"name": ident(spec["name"], f"{w}.name"), "kind": kind}
        if kind == "tensor":
            item["dtype"] = dtype(spec.get("dtype"), f"{w}.dtype")
            dims = want_list(spec.get("shape"), f"{w}.shape", 16)
            item["shape"] = tuple(
                None if d is None else want_int(d, f"{w}.shape[{j}]", 0, MAX_DIM - 1)
                for j, d in enumerate(dims)
            )
            if spec.get("format") is not None:   # an int8-kv-inputs pair: (codes, scales) of one input
                item["format"] = want_enum(spec["format"], INPUT_FORMATS, f"{w}.format")
        out.append(item)
    _check_row_pairs(out, where)
    return out


def _check_row_pairs(items: list[dict], where: str) -> None:
    """An int8-rows input is int8, followed by its float32 row-scales input: same rank, last size 1."""
    for i, item in enumerate(items):
        fmt = item.get("format")
        if fmt == "int8-rows":
            nxt = items[i + 1] if i + 1 < len(items) else {}
            if item["dtype"] != torch.int8 or nxt.get("format") != "row-scales" \
                    or nxt["dtype"] != torch.float32 \
                    or len(nxt["shape"]) != len(item["shape"]) or nxt["shape"][-1:] != (1,):
                raise fail(f"{where}[{i}]", "an int8-rows input must be int8 and be followed by its float32 "
                                            "row-scales input of the same rank with last size 1")
        elif fmt == "row-scales" and (i == 0 or items[i - 1].get("format") != "int8-rows"):
            raise fail(f"{where}[{i}]", "a row-scales input must follow its int8-rows input")
