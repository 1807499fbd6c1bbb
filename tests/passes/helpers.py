"""Run a pipeline on a model and return the resulting graph module."""
from __future__ import annotations

import fxquant


def run(model, inputs, passes):
    return fxquant.compile_lowbit(model.eval(), inputs, passes=passes).graph_module


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)
