"""One precision budget for a whole Whisper model: encoder, cross-attention cache and decoder step.

Each part is captured and calibrated on its own graph, then the sensitivity pass scores every
candidate format of every tie group (at budgets of >= 4 bits three measured per group, the others
estimated from their Hessian-weighted weight error; below, all measured) with one common error: the
KL divergence of the fp32 decoder's next-token distribution, teacher-forced on real transcripts, when
only that group's weights change.
(An encoder candidate changes the audio features, which the fp32 cross cache and decoder read; a
cross-cache candidate changes the keys/values the fp32 decoder reads; a decoder candidate changes the
logits directly.) One knapsack over all groups of all parts then picks the formats under the budget
(`avg_bits` over every weight of the three parts, the tied token table counted once), and each part
finishes its pipeline (quantize, lower, kernels) with those decisions.

Example:
    >>> enc, cross, step = compile_jointly(parts, avg_bits=4.0)     # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

from fxquant import ir
from fxquant.errors import ConfigError
from fxquant.passmanager import PassManager
from fxquant.registry import PassContext
from fxquant.rules import asks_for_gptq
from fxquant.runtime import CompiledModule, tensor_bytes
from fxquant.sensitivity import budget_mode, plan, solve
from fxquant.tracing import capture, eval_mode

__all__ = ["PartSpec", "compile_jointly", "ANALYSIS", "FINISH"]

ANALYSIS = "cleanup,fold-bn,const-fold,linearize,propagate-shapes,calibrate,sensitivity"
FINISH = ("assign-precision,quantize,tie-embeddings,lower,merge-siblings,fuse-layernorm,fuse-residual,"
          "lower-attention")


@dataclasses.dataclass
class PartSpec:
    """One graph of the model: its module, example inputs, calibration items and KL readout."""

    name: str
    module: Any
    example: tuple
    calibration: list[tuple]
    readout: Callable[[Any, int], Any]      # (outputs, calibration index) -> logits
    max_batches: int | None = None          # calibration items per sensitivity measurement (None: the compile's)
    sensitivity_inputs: list[tuple] | None = None   # measure on these instead of the first calibration items
    rules: dict | None = None               # this part's default rules; the compile's own rules come after (win)


def _finish_pipeline(target: str) -> str:
    from fxquant.api import BOUNDARY

    return f"{FINISH},{BOUNDARY}" if target == "reference" else f"{FINISH},codegen{{target={target}}},{BOUNDARY}"


def compile_jointly(parts: list[PartSpec], avg_bits: float | None = None, budget_bytes: int | None = None,
                    target: str = "native", max_batches: int = 4, log=None, awq: bool = False,
                    measure: str = "auto", **options: Any) -> list[CompiledModule]:
    """Compile several graphs under one budget; returns one CompiledModule per part, in order.

    awq=True runs the awq-scale pass (activation-aware channel scales) before the sensitivity sweep.
    measure: the sensitivity pass's option: "anchors" (three formats per group measured, the others
    estimated from their Hessian-weighted weight error), "all" (every format measured) or "auto" (the
    default: anchors for budgets of >= 4 bits a weight, all below; see passes/sensitivity.py).
    """
    config = {"avg_bits": avg_bits, "budget_bytes": budget_bytes, "target": target, **options}
    mode, budget, label = budget_mode(config)
    if mode is None:
        raise ConfigError("compile_jointly needs avg_bits or budget_bytes")
    log = log or (lambda *a: None)
    states = []
    for spec in parts:
        start = time.perf_counter()
        gm = capture(spec.module, spec.example)
        cfg = dict(config, sensitivity_readout=spec.readout)
        if spec.rules:          # the part's defaults first, so that the compile's own rules win
            given = config.get("rules") or {}
            given = list(given.items() if isinstance(given, dict) else given)
            mine = {p for p, _ in given}
            cfg["rules"] = [(p, v) for p, v in spec.rules.items() if p not in mine] + given
        if spec.sensitivity_inputs:
            cfg["sensitivity_inputs"] = spec.sensitivity_inputs
        ctx = PassContext(example_inputs=spec.example, calibration=spec.calibration, config=cfg,
                          progress=sys.stderr.isatty(), model=spec.module)
        batches = min(spec.max_batches, max_batches) if spec.max_batches else max_batches
        analysis = f"{ANALYSIS}{{max_batches={batches},measure={measure}}}"
        if awq:
            analysis = analysis.replace(",sensitivity", ",awq-scale,sensitivity")
        elif not asks_for_gptq(config):     # nothing reads the full H (awq-scale and GPTQ do)
            analysis = analysis.replace(",calibrate,", ",calibrate{full_h=False},")
        pm = PassManager(analysis)
        with eval_mode(spec.module):
            gm = pm.run(gm, ctx)
        states.append((spec, gm, ctx, pm))
        sens = next((t for t in pm.timings if t.name == "sensitivity"), None)
        log(f"{spec.name}: captured, calibrated and measured in {time.perf_counter() - start:.1f} s"
            + (f" (sensitivity {sens.seconds:.1f} s: {sens.message})" if sens else ""))
    decisions = _solve_jointly(states, mode, budget, label)
    out = []
    for (spec, gm, ctx, pm), chosen in zip(states, decisions):
        ctx.config = dict(ctx.config, decisions=chosen)
        ctx.config.pop("sensitivity_readout", None)
        ctx.config.pop("sensitivity_inputs", None)
        finish = PassManager(_finish_pipeline(target))
        start = time.perf_counter()
        with eval_mode(spec.module):
            gm = finish.run(gm, ctx)
        log(f"{spec.name}: quantized, lowered and built in {time.perf_counter() - start:.1f} s")
        out.append(CompiledModule(gm, pipeline=f"{ANALYSIS},{_finish_pipeline(target)}",
                                  timings=pm.timings + finish.timings, config=ctx.config, name=spec.name,
                                  fp32_bytes=tensor_bytes(spec.module), example_inputs=spec.example))
    return out


def _solve_jointly(states, mode: str, budget: float, label: str) -> list[dict[str, ir.QuantDecision]]:
    """One knapsack over the tie groups of every part (groups sharing a weight across parts count once)."""
    metric = "bits" if mode == "bits" else "bytes"
    entries = []          # (part index, group, options)
    total_params, pinned_cost, seen = 0, 0, set()
    for p, (spec, gm, ctx, _) in enumerate(states):
        by_name = {n.name: n for n in gm.graph.nodes}
        for g in plan(gm, ctx.config):
            key = _weight_key(gm, by_name[g.names[0]])
            if key in seen:                  # the same tensor in another part: already counted
                continue
            seen.add(key)
            total_params += g.params
            if g.pinned is not None:
                pinned_cost += g.cost(g.pinned, metric)
                continue
            sens = by_name[g.names[0]].meta.get(ir.SENSITIVITY) or {}
            missing = [c.label() for c in g.candidates if c.label() not in sens]
            if missing:
                raise ConfigError(f"{spec.name}: no sensitivity measured for {missing[0]} of {g.names[0]}")
            entries.append((p, g, [(g.cost(c, metric), sens[c.label()]) for c in g.candidates]))
    limit = (budget * total_params if mode == "bits" else budget) - pinned_cost
    picks = solve([opts for _, _, opts in entries], limit)
    decisions: list[dict[str, ir.QuantDecision]] = [{} for _ in states]
    whole = f"{label} (whole model)"
    for (p, g, _), j in zip(entries, picks):
        decisions[p][g.names[0]] = dataclasses.replace(g.candidates[j], decided_by=whole)
    return decisions


def _weight_key(gm, node) -> tuple:
    w = ir.node_weight(gm, node)
    return (w.data_ptr(), tuple(w.shape))
