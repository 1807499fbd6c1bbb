"""sensitivity (analysis): per tie group and candidate format, the model-output error when only that
group's weights take the candidate (round-to-nearest, weighted by calibration diag(H)).

Runs only when compile options ask for a budget (avg_bits or budget_bytes); otherwise a no-op.
Writes meta[ir.SENSITIVITY] = {decision label: error} on every member of each measured group.
Error metric (option `metric`): "mse" = ||y - y_fp32||^2 / ||y_fp32||^2 over all outputs,
"kl" = mean KL(softmax(y_fp32) || softmax(y)) over the last dim, "auto" (default) = "kl" when the
model's single output looks like log-probabilities (logsumexp == 0 along the last dim), else "mse".
Config key `sensitivity_readout` (a callable (outputs, calibration index) -> logits) measures the
error downstream instead: e.g. a Whisper encoder's candidates scored by the KL of the next-token
distribution of the fp32 decoder run on the changed audio features ("kl" under "auto").
Config key `sensitivity_inputs` (a list of input tuples) gives the measurements their own inputs
instead of the first max_batches calibration items (the readout's index then counts into them): e.g. one
30 s window packed with several calibration clips, which carries more speech than two padded windows
at half the cost.

Example:
    >>> import torch, fxquant.tracing as c
    >>> from fxquant.registry import PassContext
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = c.capture(m, (torch.randn(4, 8),))
    >>> ctx = PassContext(example_inputs=(torch.randn(4, 8),), config={"avg_bits": 4},
    ...                   options=SensitivityOptions())
    >>> _ = sensitivity(gm, ctx)
    >>> sorted(next(n for n in gm.graph.nodes if n.op == "call_function").meta["fxq_sensitivity"])[:2]
    ['W2 codebook/channel A8', 'W2 uniform/channel A8']
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxquant import ir
from fxquant.analysis import SensitivityTable
from fxquant.formats import quantize_weight
from fxquant.quant_cache import quant_cache
from fxquant.qweight import dequantize
from fxquant.quantizers import nodes as qn
from fxquant.registry import PassResult, calibration_batches, register_pass
from fxquant.sensitivity import budget_mode, plan
from fxquant.sensitivity_estimate import ANCHORED_MIN_BITS, choose_anchors, estimate_errors, weight_proxy

from fxquant.progress import Progress


METRICS = ("auto", "mse", "kl")


MEASURES = ("all", "anchors", "auto")


@dataclass
class SensitivityOptions:
    metric: str = "auto"      # "auto" | "mse" | "kl"
    max_batches: int = 4      # calibration items used per measurement
    measure: str = "all"      # "all" candidates, "anchors" (fxquant.sensitivity_estimate) + estimates, or
    # "auto": anchors when the budget averages >= ANCHORED_MIN_BITS, else all. Measured on Whisper tiny.en
    # (186 LJ Speech clips): avg 4 bits 3.99 % WER anchored vs 4.17 % all; avg 3 bits 62.2 % anchored vs
    # 13.0 % all (the 2-bit estimates mislead the solver where the budget forces 2-bit layers).


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.detach().float()]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def reference_logprobs(ref: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(log p, p) of each reference output, for output_error's "kl" (computed once, not per candidate)."""
    return [(lp, lp.exp()) for lp in (F.log_softmax(r, -1) for r in ref)]


def output_error(ref: list, out: list[torch.Tensor], metric: str) -> float:
    """Error of outputs against the fp32 reference: relative squared error ("mse") or mean KL ("kl"; ref may
    hold reference_logprobs pairs)."""
    if metric == "kl":
        total = 0.0
        for r, o in zip(ref, out):
            lp_r, p_r = r if isinstance(r, tuple) else reference_logprobs([r])[0]
            total += (p_r * (lp_r - F.log_softmax(o, -1))).sum(-1).mean().item()
        return total / max(len(ref), 1)
    num = sum((r - o).double().pow(2).sum().item() for r, o in zip(ref, out))
    den = sum(r.double().pow(2).sum().item() for r in ref)
    return num / max(den, 1e-30)


def resolve_metric(metric: str, ref: list[torch.Tensor], readout: bool = False) -> str:
    if metric not in METRICS:
        from fxquant.errors import ConfigError
        raise ConfigError(f"sensitivity option metric must be one of {METRICS}, got {metric!r}")
    if metric != "auto":
        return metric
    if readout:   # a readout maps outputs to logits (e.g. a speech model's next-token scores)
        return "kl"
    if len(ref) == 1 and ref[0].dim() >= 1 and ref[0].shape[-1] > 1:
        lse = torch.logsumexp(ref[0], -1)
        if lse.abs().max().item() < 1e-3:
            return "kl"
    return "mse"


class _Replay(fx.Interpreter):
    """Runs the graph keeping every value (no garbage collection), so later runs can start mid-graph."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)


def downstream(members: list[fx.Node]) -> set[fx.Node]:
    """The members and every node that (transitively) uses their outputs."""
    seen, stack = set(), list(members)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.users)
    return seen


def run_with_weights(gm: fx.GraphModule, batch: tuple, ref_env: dict, members: list[fx.Node],
                     new: list[torch.Tensor]):
    """Model output with the members' weights replaced, recomputing only what depends on them.

    Nothing is written to the module: the candidate weights enter through the interpreter's
    environment, so the parameters (which the user's model may share) are never touched.
    """
    dirty = downstream(members)
    env = {n: v for n, v in ref_env.items() if n not in dirty}
    for node, w in zip(members, new):
        env[node.args[1]] = w.view_as(ref_env[node.args[1]])
    return _Replay(gm).run(*batch, initial_env=env)


def fake_quant(gm: fx.GraphModule, node: fx.Node, decision: ir.QuantDecision, cache=None) -> torch.Tensor:
    """Dequantized weight of a node in a decision's format (round-to-nearest, calibrated diag(H)).

    With the compile's QuantCache (fxquant.quant_cache), the quantize pass reuses the result.
    """
    w = ir.node_weight(gm, node)
    stats = node.meta.get(ir.ACT_STATS) or {}
    d = decision
    args = (w, d.weight_bits, d.scheme, d.granularity, d.group_size, d.symmetric)
    kwargs = dict(hdiag=stats.get("hdiag"), where=qn.describe(node))
    qw = cache.quantize(*args, **kwargs) if cache is not None else quantize_weight(*args, **kwargs)
    return dequantize(qw).view_as(w)


def _target_bits(config: dict, groups) -> float:
    """The average weight width the budget asks for (avg_bits, or budget_bytes over the groups' weights)."""
    if config.get("avg_bits") is not None:
        return float(config["avg_bits"])
    params = sum(g.params for g in groups) or 1
    return 8.0 * float(config["budget_bytes"]) / params


PROXY_SAMPLE_PARAMS = 1 << 16   # weights above this many params get their proxy from a sample of rows


def candidate_proxy(gm: fx.GraphModule, node: fx.Node, decision: ir.QuantDecision, cache=None) -> float:
    """The node's Hessian-weighted weight error in a candidate format (sensitivity_estimate.weight_proxy).

    A weight of more than PROXY_SAMPLE_PARAMS params is scored on every s-th output row, scaled by s:
    per-channel and per-group formats quantize rows independently, so the sampled rows are exactly what the
    full quantization gives them (a per-tensor grid is fitted on the sample: an estimate), and every
    candidate of a group is scored on the same rows. For Whisper tiny.en this turns the k-means codebooks of
    every layer (51864 x 384 for the token table) into ones of 1/4 to 1/304 of the rows; anchors are still
    measured on the full weight.
    """
    w = ir.node_weight(gm, node).detach()
    hdiag = (node.meta.get(ir.ACT_STATS) or {}).get("hdiag")
    step = -(-w.numel() // PROXY_SAMPLE_PARAMS)
    if step <= 1:
        return weight_proxy(w, fake_quant(gm, node, decision, cache), hdiag)
    rows = w[::step]
    d = decision
    qw = quantize_weight(rows, d.weight_bits, d.scheme, d.granularity, d.group_size, d.symmetric, hdiag=hdiag,
                         where=qn.describe(node))
    return weight_proxy(rows, dequantize(qw).view_as(rows), hdiag) * (w.shape[0] / rows.shape[0])


def _anchored_errors(gm, grp, members, cache, measure, target: float) -> tuple[list[float], int]:
    """Measure the anchor candidates, estimate the others from their Hessian-weighted weight error."""
    proxies = []
    for cand in grp.candidates:        # one dequantized candidate alive at a time (the token table is large)
        proxies.append(sum(candidate_proxy(gm, m, cand, cache) for m in members))
    costs = [grp.cost(c, "bytes") for c in grp.candidates]
    bits = [c.weight_bits or 32 for c in grp.candidates]
    anchors = choose_anchors(costs, proxies, bits, target)
    return estimate_errors(proxies, {i: measure(grp.candidates[i]) for i in anchors}), len(anchors)


@register_pass("sensitivity", options=SensitivityOptions, kind="analysis", provides=(SensitivityTable,))
def sensitivity(gm: fx.GraphModule, ctx) -> PassResult:
    """Measure each candidate format's output error per tie group (only under avg_bits / budget_bytes)."""
    opts = ctx.options or SensitivityOptions()
    if opts.measure not in MEASURES:
        from fxquant.errors import ConfigError
        raise ConfigError(f"sensitivity option measure must be one of {MEASURES}, got {opts.measure!r}")
    config = ctx.config or {}
    mode, _, _ = budget_mode(config)
    if mode is None:
        ctx.analyses.set(SensitivityTable())
        return PassResult(changed=False, message="skipped: no avg_bits / budget_bytes budget")
    groups = [g for g in plan(gm, config) if g.pinned is None]
    own = config.get("sensitivity_inputs")
    if own:          # max_batches counts as for calibration items: 0 = all of them
        batches = [tuple(b) for b in own][:opts.max_batches or None]
    else:
        batches = calibration_batches(ctx, opts.max_batches)
    by_name = {n.name: n for n in gm.graph.nodes}
    table = SensitivityTable()
    readout = config.get("sensitivity_readout") or (lambda out, i: out)
    cache = quant_cache(ctx)
    with torch.no_grad():
        envs, refs = [], []
        for i, b in enumerate(batches):
            replay = _Replay(gm)
            refs.append(_tensors(readout(replay.run(*b), i)))
            envs.append(replay.env)
        metric = resolve_metric(opts.metric, refs[0], readout=config.get("sensitivity_readout") is not None)
        if metric == "kl":
            refs = [reference_logprobs(r) for r in refs]
        target = _target_bits(config, groups)
        anchored = opts.measure == "anchors" or (opts.measure == "auto" and target >= ANCHORED_MIN_BITS)
        total = sum(len(g.candidates) for g in groups)
        bar = Progress("sensitivity", total, bool(ctx.progress))
        done = measured_count = 0
        for grp in groups:
            members = [by_name[n] for n in grp.names]

            def measure(cand) -> float:
                new = [fake_quant(gm, m, cand, cache) for m in members]
                errs = [
                    output_error(r, _tensors(readout(run_with_weights(gm, b, env, members, new), i)), metric)
                    for i, (r, b, env) in enumerate(zip(refs, batches, envs))
                ]
                return sum(errs) / len(errs)

            if anchored and len(grp.candidates) > 3:
                errors, n_measured = _anchored_errors(gm, grp, members, cache, measure, target)
            else:
                errors, n_measured = [measure(c) for c in grp.candidates], len(grp.candidates)
            measured_count += n_measured
            result = {c.label(): e for c, e in zip(grp.candidates, errors)}
            done += len(grp.candidates)
            bar.step(done)
            for m in members:
                m.meta[ir.SENSITIVITY] = dict(result)
                table.errors[m.name] = dict(result)
    table.metric = metric
    ctx.analyses.set(table)
    return PassResult(
        changed=False,
        message=f"{len(groups)} groups: {measured_count} of {total} candidates measured ({metric}) on "
                f"{len(batches)} batches" + ("" if measured_count == total else ", the rest estimated"),
    )
