"""Mixed-precision planning shared by the sensitivity and assign-precision passes.

- `plan(gm, config)`: one entry per tie group of quantizable nodes: either pinned (a rule with
  bits / float, or the depthwise default) or a list of candidate decisions for the solver.
- Tie groups (networkx connected components): nodes reading the same weight tensor, and (when
  config "tie_siblings" is true, the default) linear nodes that read the same input node and
  live in the same parent module (q/k/v of one attention): they must share one decision.
- `solve(options, budget)`: multiple-choice knapsack by dynamic programming over discretised
  cost: pick one option per group minimising summed sensitivity with summed cost <= budget.
  Costs are rounded *up* to units, so the exact budget always holds.

Budget metrics: avg_bits = sum(weight_bits * params) / sum(params) over all quantizable nodes
(float = 32 bits, pinned nodes counted honestly); budget_bytes = sum of exact packed bytes
(`formats.weight_bytes`: codes + scales + tables + indices; biases not included).

Example:
    >>> solve([[(8, 0.0), (4, 1.0)], [(8, 0.0), (4, 0.1)]], budget=12)
    [0, 1]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from . import ir, rules as rules_mod
from .errors import ConfigError
from .formats import candidates as format_candidates, default_granularity, scheme_options, weight_bytes
from .quantizers import nodes as qn



def candidate_table() -> dict[str, tuple[tuple[int, str], ...]]:
    """scheme option -> the (bits, format) candidates, read from the format table (fxquant.formats)."""
    return {scheme: format_candidates(scheme) for scheme in scheme_options()}


@dataclass
class Group:
    """A tie group: member nodes, their [N, K] shapes, and a pinned decision or candidates."""

    names: list[str]
    shapes: list[tuple[int, int]]
    pinned: ir.QuantDecision | None = None
    candidates: list[ir.QuantDecision] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(n * k for n, k in self.shapes)

    def cost(self, d: ir.QuantDecision, metric: str) -> int:
        if metric == "bits":
            return (32 if d.weight_bits is None else d.weight_bits) * self.params
        return sum(weight_bytes(s, d.weight_bits, d.scheme, d.granularity, d.group_size, d.symmetric)
                   for s in self.shapes)


def budget_mode(config: dict) -> tuple[str | None, float | None, str]:
    """('bits' | 'bytes' | None, budget value, decided_by label) from config; ConfigError on conflicts."""
    given = [k for k in ("bits", "avg_bits", "budget_bytes") if config.get(k) is not None]
    if len(given) > 1:
        raise ConfigError(f"options {' and '.join(given)} are exclusive: give bits (uniform width), avg_bits "
                          f"(average weight bits) or budget_bytes (total weight bytes), not several")
    if config.get("avg_bits") is not None:
        v = config["avg_bits"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 32:
            raise ConfigError(f"avg_bits must be a number in (0, 32], got {v!r}")
        return "bits", float(v), f"budget:avg_bits={float(v):g}"
    if config.get("budget_bytes") is not None:
        v = config["budget_bytes"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"budget_bytes must be a positive number, got {v!r}")
        return "bytes", float(v), f"budget:budget_bytes={int(v)}"
    return None, None, ""


def quantizable_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, str, str, tuple[int, int]]]:
    """(node, module name, op type, (N, K)) of every quantizable node in graph order."""
    out = []
    for node in gm.graph.nodes:
        if ir.is_quantizable(node):
            w = ir.node_weight(gm, node)
            out.append((node, ir.module_of(node), qn.op_type(node, w), (w.shape[0], w[0].numel())))
    return out


def tie_groups(gm: fx.GraphModule, nodes: list[fx.Node], tie_siblings: bool = True) -> list[list[fx.Node]]:
    """Connected components (graph order) of: same weight tensor; linear siblings sharing an input.

    A linear whose table an embedding lookup also reads (a tied token table, or one row block of it:
    fxquant.models.token_blocks) is not tied to its siblings: the blocks exist to get formats of their own.
    """
    g = nx.Graph()
    g.add_nodes_from(n.name for n in nodes)
    by_weight: dict = {}
    by_input: dict = {}
    lookups = {ir.get_attr_value(gm, n.args[0].target).data_ptr() for n in gm.graph.nodes
               if n.op == "call_function" and n.target is torch.ops.aten.embedding.default
               and getattr(n.args[0], "op", None) == "get_attr"}
    for n in nodes:
        w = ir.node_weight(gm, n)
        by_weight.setdefault((w.data_ptr(), tuple(w.shape)), []).append(n.name)
        if tie_siblings and n.target in ir.LINEAR_TARGETS and isinstance(n.args[0], fx.Node) \
                and w.data_ptr() not in lookups:
            parent = ir.module_of(n).rsplit(".", 1)[0] if "." in ir.module_of(n) else ""
            by_input.setdefault((n.args[0].name, parent), []).append(n.name)
    for members in list(by_weight.values()) + list(by_input.values()):
        nx.add_path(g, members)
    order = {n.name: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    comps = [sorted(c, key=order.get) for c in nx.connected_components(g)]
    return [[by_name[m] for m in c] for c in sorted(comps, key=lambda c: order[c[0]])]


def plan(gm: fx.GraphModule, config: dict) -> list[Group]:
    """Tie groups with their pinned decision (rules, depthwise default, global bits) or candidates."""
    mode, _, budget_label = budget_mode(config)
    nodes = quantizable_nodes(gm)
    info = {n.name: (mod, op, shape) for n, mod, op, shape in nodes}
    parsed = rules_mod.parse_rules(config.get("rules"))
    chosen = rules_mod.assign(parsed, [(n.name, mod, op) for n, mod, op, _ in nodes])
    depthwise_bits = config.get("depthwise_bits", 8)
    scheme = config.get("scheme") or ("auto" if mode else "uniform")
    table = candidate_table()
    if scheme not in table:
        raise ConfigError(f"scheme must be one of {sorted(table)}, got {scheme!r}")
    groups = []
    for members in tie_groups(gm, [n for n, *_ in nodes], config.get("tie_siblings", True)):
        names = [m.name for m in members]
        grp = Group(names, [info[n][2] for n in names])
        k = min(s[1] for s in grp.shapes)
        ruled = [chosen[n] for n in names if n in chosen]
        rule = max(ruled, key=lambda r: (-rules_mod.KINDS.index(r.kind), r.order)) if ruled else None
        where = f"rule {rule.pattern!r} on node {names[0]!r}" if rule else f"node {names[0]!r}"
        spec = rule.value if rule else {}
        decided = config.get("decisions") or {}
        if names[0] in decided:        # an outer planner (e.g. one budget over several graphs) decided
            grp.pinned = decided[names[0]]
        elif rule is not None and rule.pins:
            grp.pinned = rules_mod.make_decision(spec, config, k, f"rule:{rule.pattern}", where)
        elif rule is None and depthwise_bits is not None and all(info[n][1] == "depthwise" for n in names):
            spec_dw = {"bits": depthwise_bits, "scheme": "uniform", "granularity": "channel"}
            label = f"default:depthwise={depthwise_bits}"
            grp.pinned = rules_mod.make_decision(spec_dw, config, k, label, where)
        elif mode is None:
            bits = config.get("bits")
            label = f"bits={bits}" if bits is not None else "default:W8"
            grp.pinned = rules_mod.make_decision(spec, {**config, "bits": bits or 8}, k, label, where)
        else:
            floor = spec.get("min_bits", config.get("min_bits", 2))
            for bits, sch in table[scheme]:
                if "scheme" in spec and spec["scheme"] != sch or bits < floor:
                    continue
                cand_spec = {k: v for k, v in spec.items() if k != "min_bits"} | {"bits": bits, "scheme": sch}
                granularity = default_granularity(sch, bits, "group" in spec)
                if granularity == "group":  # the format keeps a group the rule asked for
                    cand_spec["granularity"] = "group"
                elif granularity is not None:
                    cand_spec.setdefault("granularity", granularity)
                if "granularity" in spec and spec["granularity"] != "group":
                    cand_spec.pop("group", None)
                if not cand_spec.get("symmetric", True) and bits == 8:
                    continue
                grp.candidates.append(rules_mod.make_decision(cand_spec, config, k, budget_label, where))
            if not grp.candidates:
                raise ConfigError(f"{where}: no candidate format satisfies {spec} under scheme={scheme!r}")
        groups.append(grp)
    return groups


def solve(options: list[list[tuple[float, float]]], budget: float, resolution: int = 5000) -> list[int]:
    """Pick one (cost, sensitivity) option per group: min sum sensitivity s.t. sum cost <= budget.

    ConfigError when even the cheapest options exceed the budget (message gives the minimum).
    """
    min_cost = sum(min(c for c, _ in opts) for opts in options)
    if min_cost > budget + 1e-9:
        raise ConfigError(f"budget too small: the cheapest formats need {min_cost:g}, budget is {budget:g}")
    if not options:
        return []
    costs = [c for opts in options for c, _ in opts]
    unit = 0
    if all(float(c).is_integer() for c in costs):
        unit = math.gcd(*(int(c) for c in costs))  # exact DP when the costs share a large divisor
    if not unit or budget / unit > 8 * resolution:
        unit = max(budget / resolution, 1e-12)  # otherwise round costs up (the budget still holds)
    cap = int(math.floor(budget / unit + 1e-9))
    inf = float("inf")
    dp = torch.full((cap + 1,), inf, dtype=torch.float64)
    dp[0] = 0.0
    choices = []
    for opts in options:
        new = torch.full_like(dp, inf)
        pick = torch.full((cap + 1,), -1, dtype=torch.long)
        for j, (c, s) in enumerate(opts):
            cu = int(math.ceil(c / unit - 1e-9))
            if cu > cap:
                continue
            cand = torch.full_like(dp, inf)
            cand[cu:] = dp[: cap + 1 - cu] + s
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, j), pick)
        dp = new
        choices.append((pick, opts, unit))
    if not torch.isfinite(dp).any():  # only possible through the rounding up of costs
        raise ConfigError(
            f"budget {budget:g} is too tight for the cost discretisation; raise it slightly "
            f"(minimum {min_cost:g})"
        )
    c = int(torch.argmin(dp))
    out = []
    for pick, opts, unit in reversed(choices):
        j = int(pick[c])
        out.append(j)
        c -= int(math.ceil(opts[j][0] / unit - 1e-9))
    return out[::-1]
