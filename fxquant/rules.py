"""Per-node quantization rules: match nodes by module name or op type, turn specs into decisions.

Patterns (the keys of `rules=`):
    "encoder.conv1"          exact module name
    "re:encoder\\.blocks\\.[0-3]\\..*"   regular expression (re.fullmatch on the module name)
    "encoder.*.mlp.?"        glob (fnmatch: * ? [..]), on the module name
    "op:linear"              op type: linear, conv1d, conv2d, conv (any conv), depthwise (groups == C_in > 1)

Precedence (one rule decides a node, its fields are not merged with other rules'):
    exact  >  re:  >  glob  >  op:  >  the global options (bits / avg_bits / budget_bytes / default W8)
    Among rules of the same kind that match one node, the LATER rule (dict / list order) wins.

Values: an int (bits), "float", or a dict with keys
    bits (2..8), scheme ("uniform" | "codebook"), group (elements per scale group, > 0), granularity
    ("tensor" | "channel" | "group"), symmetric (bool; 8-bit asymmetric is impossible), act_bits (8 | None),
    act_mode ("dynamic" | "static"), rounding ("nearest" | "gptq"), float (True: keep fp32), min_bits (under
    a budget, the smallest width the solver may pick for these nodes; like compile_lowbit's min_bits).
A dict without bits under avg_bits / budget_bytes does not pin the node: it restricts the solver's
candidates to those matching its scheme / granularity / group / symmetric / min_bits.

Errors (ConfigError naming the rule, and listing real module names): unknown key, impossible value,
the same pattern twice with different values, a rule that matches no quantizable node.

Example:
    >>> rules = parse_rules({"op:linear": 4, "encoder.*": {"bits": 3, "scheme": "codebook"}, "head": "float"})
    >>> [(r.kind, r.pattern) for r in rules]
    [('op', 'op:linear'), ('glob', 'encoder.*'), ('exact', 'head')]
    >>> pick(rules, "encoder.fc1", "linear").pattern
    'encoder.*'
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import ConfigError
from .formats import AUTO, check_bits, default_granularity, get_format, quantized_formats, resolve_group_size

KINDS = ("exact", "regex", "glob", "op")          # highest precedence first
OP_TYPES = ("linear", "conv1d", "conv2d", "conv", "depthwise")
KEYS = ("bits", "scheme", "group", "granularity", "symmetric", "act_bits", "act_mode", "rounding", "float",
        "min_bits")
MIN_BITS_CHOICES = (2, 3, 4, 5, 6, 8)   # the widths a budget may floor at (compile_lowbit and rules)
DEFAULT_SCHEME = "uniform"   # widths a global scheme has no candidate for fall back to this format


@dataclass(frozen=True)
class Rule:
    pattern: str
    kind: str
    spec: tuple            # sorted (key, value) pairs of the normalised dict
    order: int

    @property
    def value(self) -> dict:
        return dict(self.spec)

    @property
    def pins(self) -> bool:
        """True when the rule fixes the bit width (or float) rather than only restricting candidates."""
        v = self.value
        return "bits" in v or bool(v.get("float"))

    def matches(self, module: str, op_type: str) -> bool:
        if self.kind == "op":
            want = self.pattern[3:]
            return want == op_type or (want == "conv" and op_type in ("conv1d", "conv2d", "depthwise"))
        if self.kind == "regex":
            return re.fullmatch(self.pattern[3:], module) is not None
        if self.kind == "glob":
            return fnmatch.fnmatchcase(module, self.pattern)
        return module == self.pattern


def _kind(pattern: str) -> str:
    if pattern.startswith("op:"):
        return "op"
    if pattern.startswith("re:"):
        return "regex"
    if any(ch in pattern for ch in "*?["):
        return "glob"
    return "exact"


def normalise_value(pattern: str, value: Any) -> dict:
    """Validate one rule value; returns a dict of KEYS (group -> granularity 'group')."""
    where = f"rule {pattern!r}"
    if value == "float":
        return {"float": True}
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"bits": value}
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where}: value must be bits (int), 'float' or a dict of {list(KEYS)}; got {value!r}"
        )
    unknown = sorted(set(value) - set(KEYS) - {"group_size"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {list(KEYS)}")
    v = dict(value)
    if "group_size" in v:
        v["group"] = v.pop("group_size")
    if v.get("float"):
        extra = sorted(set(v) - {"float", "act_bits", "act_mode"})
        if extra:
            raise ConfigError(
                f"{where}: 'float': True keeps the weight fp32, so {extra} make no sense with it"
            )
        return {"float": True}
    v.pop("float", None)
    bits = v.get("bits")
    if "bits" in v and (isinstance(bits, bool) or not isinstance(bits, int) or bits not in (8, 4, 3, 2)):
        raise ConfigError(
            f"{where}: bits must be one of (8, 4, 3, 2) like compile_lowbit's bits, got {bits!r} "
            f"(use 'float' to keep fp32)"
        )
    if "min_bits" in v:
        m = v["min_bits"]
        if isinstance(m, bool) or m not in MIN_BITS_CHOICES:
            choices = ", ".join(map(str, MIN_BITS_CHOICES))
            raise ConfigError(f"{where}: min_bits must be one of {choices}, got {m!r}")
        if "bits" in v:
            raise ConfigError(f"{where}: bits={bits} pins the width, so min_bits={m} has no effect; give one")
    if "scheme" in v and v["scheme"] not in quantized_formats():
        raise ConfigError(
            f"{where}: scheme must be one of {quantized_formats()} (or 'float': True), got {v['scheme']!r}"
        )
    if "group" in v:
        g = v["group"]
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
            raise ConfigError(f"{where}: group must be a positive integer (e.g. 32, 64, 128), got {g!r}")
        if v.setdefault("granularity", "group") != "group":
            raise ConfigError(f"{where}: group={g} contradicts granularity={v['granularity']!r}")
    if "granularity" in v and v["granularity"] not in ("tensor", "channel", "group"):
        raise ConfigError(
            f"{where}: granularity must be 'tensor', 'channel' or 'group', got {v['granularity']!r}"
        )
    if "symmetric" in v and not isinstance(v["symmetric"], bool):
        raise ConfigError(f"{where}: symmetric must be True or False, got {v['symmetric']!r}")
    problem = (
        bits
        and v.get("symmetric") is False
        and get_format(v.get("scheme", DEFAULT_SCHEME)).check(bits, False)
    )
    if problem:
        raise ConfigError(f"{where}: {problem}")
    if "act_bits" in v and v["act_bits"] not in (8, None):
        raise ConfigError(f"{where}: act_bits must be 8 or None (float activations), got {v['act_bits']!r}")
    if "act_mode" in v and v["act_mode"] not in ("dynamic", "static"):
        raise ConfigError(f"{where}: act_mode must be 'dynamic' or 'static', got {v['act_mode']!r}")
    if "rounding" in v and v["rounding"] not in ("nearest", "gptq"):
        raise ConfigError(f"{where}: rounding must be 'nearest' or 'gptq', got {v['rounding']!r}")
    return v


def parse_rules(rules: dict | Iterable | None) -> list[Rule]:
    """Rules from a dict {pattern: value} or a list of (pattern, value) pairs, in order."""
    if rules is None:
        return []
    items = list(rules.items()) if isinstance(rules, dict) else list(rules)
    out: dict[str, Rule] = {}
    for order, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError(
                f"rules must be a dict {{pattern: value}} or a list of (pattern, value); got {item!r}"
            )
        pattern, value = item
        if not isinstance(pattern, str) or not pattern.strip():
            raise ConfigError(f"rule pattern must be a non-empty string, got {pattern!r}")
        pattern = pattern.strip()
        kind = _kind(pattern)
        if kind == "regex":
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ConfigError(f"rule {pattern!r}: invalid regular expression: {exc}") from None
        if kind == "op" and pattern[3:] not in OP_TYPES:
            raise ConfigError(
                f"rule {pattern!r}: unknown op type; valid: {', '.join('op:' + t for t in OP_TYPES)}"
            )
        spec = tuple(sorted(normalise_value(pattern, value).items(), key=lambda kv: kv[0]))
        if pattern in out and out[pattern].spec != spec:
            raise ConfigError(
                f"contradictory rules: pattern {pattern!r} is given twice with different values "
                f"{out[pattern].value} and {dict(spec)}; keep one"
            )
        out[pattern] = Rule(pattern, kind, spec, order)
    return sorted(out.values(), key=lambda r: r.order)


def pick(rules: list[Rule], module: str, op_type: str) -> Rule | None:
    """The rule deciding a node: highest precedence kind, then the later rule."""
    matching = [r for r in rules if r.matches(module, op_type)]
    if not matching:
        return None
    return max(matching, key=lambda r: (-KINDS.index(r.kind), r.order))


def assign(rules: list[Rule], nodes: list[tuple[str, str, str]]) -> dict[str, Rule]:
    """{node name: deciding rule} for nodes given as (node name, module name, op type).

    Raises ConfigError for a rule that matches no node, listing a few real module names.
    """
    used: set[str] = set()
    out: dict[str, Rule] = {}
    for name, module, op_type in nodes:
        for r in rules:
            if r.matches(module, op_type):
                used.add(r.pattern)
        rule = pick(rules, module, op_type)
        if rule is not None:
            out[name] = rule
    for r in rules:
        if r.pattern not in used:
            modules = sorted({m for _, m, _ in nodes if m})
            sample = ", ".join(modules[:6]) + (", ..." if len(modules) > 6 else "")
            ops = sorted({o for _, _, o in nodes})
            raise ConfigError(
                f"rule {r.pattern!r} matches no quantizable node. Module names look like: "
                f"{sample or '(none)'}; op types present: {', '.join('op:' + o for o in ops)}"
            )
    return out


DEFAULT_GROUP = 64


def make_decision(spec: dict, config: dict, k: int, decided_by: str, where: str):
    """QuantDecision for a node with K inputs from a (normalised) spec, filling gaps from config.

    Defaults: bits from spec, else config["bits"], else 8; scheme from spec, else config["scheme"]
    for <= 4 bits ("auto" and >= 5 bits -> uniform); granularity: codebook -> channel, uniform
    <= 4 bits -> group of config["group_size"] (64) clamped to K (per-channel when K <= group),
    uniform >= 5 bits -> channel.
    An explicit group > K in a rule is an error; the global group_size is clamped.
    """
    from . import ir

    act = {
        "act_bits": spec.get("act_bits", config.get("act_bits", 8)),
        "act_mode": spec.get("act_mode", config.get("act_mode", "dynamic")),
    }
    if spec.get("float"):
        return ir.QuantDecision(
            None,
            scheme="float",
            granularity="tensor",
            decided_by=decided_by,
            act_bits=None,
            act_mode="dynamic",
        )
    bits = spec.get("bits", config.get("bits") or 8)
    scheme = spec.get("scheme", config.get("scheme") or DEFAULT_SCHEME)
    if scheme == AUTO or ("scheme" not in spec and bits not in get_format(scheme).candidates.get(scheme, ())):
        scheme = DEFAULT_SCHEME
    symmetric = spec.get("symmetric", config.get("symmetric", True))
    check_bits(scheme, bits, symmetric, where)
    if "group" in spec:
        granularity, group = "group", spec["group"]
        resolve_group_size("group", group, k, where)
    else:
        default = default_granularity(scheme, bits) or "group"
        granularity = spec.get("granularity", default)
        group = config.get("group_size") or DEFAULT_GROUP
        if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
            raise ConfigError(f"option group_size must be a positive integer, got {group!r}")
        if granularity == "group" and group >= k:
            granularity = "channel"
    rounding = spec.get("rounding", "gptq" if config.get("gptq") else "nearest")
    return ir.QuantDecision(
        bits,
        scheme=scheme,
        granularity=granularity,
        group_size=group if granularity == "group" else None,
        symmetric=symmetric,
        rounding=rounding,
        decided_by=decided_by,
        **act,
    )


def asks_for_gptq(config: dict) -> bool:
    """Whether a compile's options ask for GPTQ rounding anywhere (option gptq, or a rule's rounding): the
    only default-pipeline reader of the calibrated full second moments H (calibrate{full_h=False} otherwise).

    >>> asks_for_gptq({"rules": {"op:linear": {"rounding": "gptq"}}}), asks_for_gptq({"bits": 4})
    (True, False)
    """
    return bool(config.get("gptq")) or any(r.value.get("rounding") == "gptq"
                                           for r in parse_rules(config.get("rules")))
