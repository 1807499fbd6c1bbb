"""Graph dumps from node.meta: a tabulate table, Graphviz DOT (jinja2) and JSON.

Example:
    >>> import torch, fxquant
    >>> gm = fxquant.capture(torch.nn.Linear(4, 2), (torch.randn(1, 4),))
    >>> print(table_text(gm))  # doctest: +SKIP
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import torch.fx as fx
from tabulate import tabulate

from . import ir

COLUMNS = ("node", "op", "target", "shape", "dtype", "module", "decision", "provenance")
_ENV = jinja2.Environment(loader=jinja2.PackageLoader("fxquant", "templates"), autoescape=False,
                          keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


def _target_name(node: fx.Node) -> str:
    t = node.target
    if callable(t):
        return getattr(t, "__name__", None) or str(t)
    return str(t)


def graph_rows(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """One dict per node with the COLUMNS keys (plain strings/lists: JSON-ready)."""
    rows = []
    for node in gm.graph.nodes:
        decision = node.meta.get(ir.DECISION)
        shape = node.meta.get(ir.SHAPE)
        rows.append({
            "node": node.name,
            "op": node.op,
            "target": _target_name(node),
            "shape": "x".join(map(str, shape)) if shape is not None else "",
            "dtype": node.meta.get(ir.DTYPE, ""),
            "module": node.meta.get(ir.MODULE, ""),
            "decision": decision.label() if decision is not None else "",
            "decided_by": decision.decided_by if decision is not None else "",
            "source": node.meta.get(ir.SOURCE, ""),
            "provenance": list(node.meta.get(ir.PROVENANCE, ())),
            "inputs": [a.name for a in node.all_input_nodes],
        })
    return rows


def table_text(gm: fx.GraphModule, include_get_attr: bool = False) -> str:
    """Human-readable per-node table (provenance shows the last entry and a count)."""
    body = []
    for r in graph_rows(gm):
        if r["op"] == "get_attr" and not include_get_attr:
            continue
        prov = r["provenance"]
        last = (prov[-1] + (f" (+{len(prov) - 1})" if len(prov) > 1 else "")) if prov else ""
        body.append(
            [r["node"], r["op"], r["target"], r["shape"], r["dtype"], r["module"], r["decision"], last]
        )
    return tabulate(body, headers=list(COLUMNS), tablefmt="simple")


def to_json(gm: fx.GraphModule) -> str:
    return json.dumps({"nodes": graph_rows(gm), "code": gm.code}, indent=1)


def to_dot(gm: fx.GraphModule, title: str = "fxquant") -> str:
    """Graphviz DOT, nodes clustered by their module (top-level component)."""
    rows = graph_rows(gm)
    clusters: dict[str, list[dict]] = {}
    for r in rows:
        clusters.setdefault(r["module"].split(".")[0] if r["module"] else "", []).append(r)
    edges = [(src, r["node"]) for r in rows for src in r["inputs"]]
    return _ENV.get_template("graph.dot.j2").render(title=title, clusters=clusters, edges=edges)


def write_dumps(gm: fx.GraphModule, directory: Path, stem: str) -> list[Path]:
    """Write stem.txt / stem.dot / stem.json into directory; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for suffix, text in (
        (".txt", table_text(gm, include_get_attr=True)),
        (".dot", to_dot(gm, stem)),
        (".json", to_json(gm)),
    ):
        path = directory / (stem + suffix)
        path.write_text(text)
        out.append(path)
    return out
