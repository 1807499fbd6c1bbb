"""Checks of a rebuilt artifact graph before it runs for real: an abstract run, then a recorded self-test.

1. `abstract_run` executes the graph on meta tensors (shapes and dtypes, no data, no allocation; every
   device argument and default device is meta, so no op computes or allocates for real) at the example
   input shapes recorded at save time. Every node's output must have the shape the compiler recorded
   and a bounded size, and every lowered op must receive inputs that fit its weights (so a kernel
   attached afterwards never reads out of bounds). An op without a meta kernel makes the run start
   again under torch's FakeTensorMode (slower to set up: it imports torch._dynamo).
2. `self_test` runs the loaded module on the example inputs stored in the artifact and compares
   with the outputs stored at save time (relative error <= 1e-3, same NaN positions).

Any failure is an ArtifactError: a manifest that passed the schema but describes another
computation is still a tampered or corrupted artifact.

Example:
    >>> x = {"name": "x", "kind": "tensor", "dtype": torch.float32, "example": (2, 64)}
    >>> abstract_run(gm, [x])                                   # doctest: +SKIP
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from . import ir
from .errors import ArtifactError
from .graphutil import conv_output_size
from .artifact_shapes import META, broadcast_shapes, makes_tensors, shape_rule, to_meta
from .ops import FusedAttention, LowbitConv, LowbitEmbedding, LowbitLinear

MAX_RUN_NUMEL = 1 << 28            # elements of any intermediate tensor during the abstract run
REL_TOL = 1e-3


def _bad(node: fx.Node, what: str) -> ArtifactError:
    return ArtifactError(
        f"the graph in manifest.json is inconsistent at node {node.name!r}: {what}; tampered or "
        f"corrupted artifact, re-save it"
    )


def _tensor_arg(node: fx.Node, value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise _bad(node, f"{what} must be a tensor, got {type(value).__name__}")
    return value


def _code_shape(mod) -> tuple[int, int]:
    """(N, K) of a lowered op's codes without touching its tensors (the abstract run uses FakeTensorMode)."""
    shape = getattr(mod, "code_shape", None)
    return tuple(shape) if shape is not None else tuple(mod.codes.shape)


def _linear(node, mod: LowbitLinear, args, kwargs):
    if len(args) + len(kwargs) > 2 or set(kwargs) - {"residual"}:
        raise _bad(node, "a linear op takes (x, residual=None)")
    x = _tensor_arg(node, args[0] if args else kwargs.get("x"), "its input")
    n, k = _code_shape(mod)
    if x.dim() < 1 or x.shape[-1] != k or not x.is_floating_point():
        raise _bad(node, f"its input {tuple(x.shape)} {x.dtype} does not end in the weight's {k} inputs")
    out = tuple(x.shape[:-1]) + (n,)
    residual = args[1] if len(args) > 1 else kwargs.get("residual")
    if bool(getattr(mod, "residual", False)) != (residual is not None):
        raise _bad(node, "the residual input does not match the op's fused residual flag")
    if residual is not None and tuple(_tensor_arg(node, residual, "residual").shape) != out:
        raise _bad(node, f"residual {tuple(residual.shape)} does not match the output {out}")
    return torch.empty(out, dtype=x.dtype, device=x.device)


def _conv(node, mod: LowbitConv, args, kwargs):
    if len(args) != 1 or kwargs:
        raise _bad(node, "a conv op takes one input")
    x = _tensor_arg(node, args[0], "its input")
    ws, dims = mod.weight_shape, mod.dims
    if x.dim() != dims + 2 or x.shape[1] != ws[1] * mod.groups or not x.is_floating_point():
        raise _bad(
            node,
            f"its input {tuple(x.shape)} does not fit a {dims}-D conv with {ws[1] * mod.groups} "
            f"input channels",
        )
    spatial = []
    for size, k, s, p, d in zip(x.shape[2:], ws[2:], mod.stride, mod.padding, mod.dilation):
        o = conv_output_size(size, k, s, p, d)
        if o < 1:
            raise _bad(node, f"its input {tuple(x.shape)} is smaller than the kernel {tuple(ws[2:])}")
        spatial.append(o)
    return torch.empty((x.shape[0], ws[0], *spatial), dtype=x.dtype, device=x.device)


def _embedding(node, mod: LowbitEmbedding, args, kwargs):
    if len(args) != 1 or kwargs:
        raise _bad(node, "an embedding lookup takes one input")
    tokens = _tensor_arg(node, args[0], "its input")
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise _bad(node, "embedding lookups take integer tokens")
    out = tuple(tokens.shape) + (_code_shape(mod)[1],)
    return torch.empty(out, dtype=torch.float32, device=tokens.device)


def _attention(node, mod: FusedAttention, args, kwargs):
    if not 3 <= len(args) <= 6 or kwargs:
        raise _bad(node, "attention takes (q, k, v, mask=None, key_scale=None, value_scale=None)")
    q, k, v = (_tensor_arg(node, a, "q/k/v") for a in args[:3])
    mask = args[3] if len(args) >= 4 else None
    for t, s in zip((k, v), (*args[4:], None, None)):   # int8 keys/values of an int8-rows input, and scales
        if s is None and not t.is_floating_point():
            raise _bad(node, f"keys/values of dtype {t.dtype} come without scales")
        if s is not None:
            s = _tensor_arg(node, s, "key/value scales")
            if not mod.kv_int8 or t.dtype != torch.int8 or s.dtype != torch.float32 \
                    or tuple(s.shape) != (*t.shape[:-1], 1):
                want = (*t.shape[:-1], 1)
                raise _bad(node, f"int8 keys/values {tuple(t.shape)} need float32 scales {want} "
                                 f"on an int8-K/V op, got {s.dtype} {tuple(s.shape)}")
    if (
        q.shape[-1] != mod.head_dim
        or k.shape[-1] != mod.head_dim
        or q.dim() != 4
        or k.dim() != 4
        or v.dim() != 4
    ):
        raise _bad(
            node, f"q {tuple(q.shape)} / k {tuple(k.shape)} do not have head dim {mod.head_dim} in 4-D"
        )
    if k.shape[-2] != v.shape[-2] or not q.is_floating_point():
        raise _bad(node, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in length, or q is not float")
    try:   # SDPA's shape rule by arithmetic (torch's meta function of SDPA would import torch._dynamo)
        batch = broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        scores = (*batch, q.shape[-2], k.shape[-2])
        mask_shape = None if mask is None else _tensor_arg(node, mask, "the mask").shape
        if mask is not None and broadcast_shapes(mask_shape, scores) != scores:
            raise ValueError(f"the mask {tuple(mask.shape)} does not broadcast to the scores {scores}")
    except ValueError as exc:
        raise _bad(node, f"q/k/v/mask do not broadcast ({str(exc)[:200]})") from None
    return torch.empty((*batch, q.shape[-2], v.shape[-1]), dtype=q.dtype, device=q.device)


_RULES = (
    (FusedAttention, _attention),
    (LowbitEmbedding, _embedding),
    (LowbitConv, _conv),
    (LowbitLinear, _linear),
)


def _module_rule(node: fx.Node, mod: torch.nn.Module, args, kwargs):
    for cls, rule in _RULES:
        if isinstance(mod, cls):
            return rule(node, mod, args, kwargs)
    raise _bad(node, f"module {type(mod).__name__} is not a lowered op")


class _OpFailed(Exception):
    """An op raised during the meta run: the FakeTensorMode run decides (it has more kernels)."""


class _AbstractRun:
    """Executes a graph node by node on abstract tensors (a small fx interpreter without error rewriting):
    meta tensors (mode None), or fake tensors of a FakeTensorMode."""

    def __init__(self, gm: fx.GraphModule, mode, expected: dict[str, Any] | None):
        self.gm, self.mode, self.expected = gm, mode, expected
        self.fakes: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, Any] = {}

    def fake_attr(self, target: str) -> torch.Tensor:
        if target not in self.fakes:
            value = ir.get_attr_value(self.gm, target)
            self.fakes[target] = value.to(META) if self.mode is None else self.mode.from_tensor(value)
        return self.fakes[target]

    def node_value(self, node: fx.Node, args, kwargs) -> Any:
        if node.op == "get_attr":
            return self.fake_attr(node.target)
        if node.op == "call_function":
            if self.mode is None:
                args, kwargs = to_meta(args), to_meta(kwargs)
                if makes_tensors(node.target):       # factories: explicitly on meta, never on the CPU
                    kwargs = {**kwargs, "device": META}
                out = shape_rule(node.target, args, kwargs)
                if out is not None:
                    return out
            return node.target(*args, **kwargs)
        return _module_rule(node, self.gm.get_submodule(node.target), args, kwargs)

    def run(self, inputs: list[dict]) -> dict[str, Any]:
        env: dict[fx.Node, Any] = {}
        feed = iter(inputs)
        device = META if self.mode is None else None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                item = next(feed, None)
                if item is None or item["kind"] not in ("tensor", "none"):
                    raise _bad(node, "inputs other than tensors or None cannot be checked")
                env[node] = (
                    torch.empty(item["example"], dtype=item["dtype"], device=device)
                    if item["kind"] == "tensor" else None
                )
                continue
            if node.op == "output":
                break
            if node.op == "call_module" and node.target == "_guards_fn":
                env[node] = None  # torch.export's guards on a live graph (artifacts drop them)
                continue
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            try:
                out = self.node_value(node, args, kwargs)
            except ArtifactError:
                raise
            except Exception as exc:
                if self.mode is None:
                    raise _OpFailed() from None
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                raise _bad(node, f"{type(exc).__name__}: {first}") from None
            env[node] = out
            self.check(node, out)
        return self.shapes

    def check(self, node: fx.Node, out: Any) -> None:
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > MAX_RUN_NUMEL:
                raise _bad(node, f"its output {tuple(t.shape)} would exceed {MAX_RUN_NUMEL} elements")
            if self.mode is None and isinstance(t, torch.Tensor) and t.device != META:
                raise _OpFailed()     # a real tensor came out of the meta run: let the fake run judge
        shape = [int(d) for d in out.shape] if isinstance(out, torch.Tensor) else None
        if self.expected is not None and self.expected.get(node.name) != shape:
            raise _bad(
                node, f"it computes shape {shape}, the artifact recorded {self.expected.get(node.name)}"
            )
        self.shapes[node.name] = shape


def abstract_run(
    gm: fx.GraphModule, inputs: list[dict], expected: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run gm on meta tensors (else fake tensors) at the recorded example input shapes.

    Returns {node name: output shape (list) or None}; with `expected` (the shapes recorded at save
    time) every node must reproduce its recorded shape. Raises ArtifactError on any inconsistency.
    """
    try:
        with META, torch.no_grad():
            return _AbstractRun(gm, None, expected).run(inputs)
    except _OpFailed:
        pass
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")  # it logs every op a bad graph fails on
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with mode, torch.no_grad():
            return _AbstractRun(gm, mode, expected).run(inputs)
    finally:
        fake_log.setLevel(level)


def compare_outputs(got: Any, want: list[torch.Tensor]) -> str | None:
    """None when `got` (any pytree) matches the recorded leaves; else what differs."""
    leaves = [t for t in pytree.tree_leaves(got)]
    if len(leaves) != len(want):
        return f"{len(leaves)} outputs instead of {len(want)}"
    for i, (a, b) in enumerate(zip(leaves, want)):
        if not isinstance(a, torch.Tensor) or tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            return (
                f"output {i} is {getattr(a, 'shape', type(a).__name__)} instead of {tuple(b.shape)} {b.dtype}"
            )
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"output {i} differs"
            continue
        if not torch.equal(torch.isnan(a), torch.isnan(b)):
            return f"output {i} has NaN where the recorded output has none (or the reverse)"
        fa, fb = a.double().nan_to_num(0.0), b.double().nan_to_num(0.0)
        scale = max(float(fb.norm()), 1e-30)
        err = float((fa - fb).norm()) / scale
        if not err <= REL_TOL:
            return f"output {i} differs from the recorded one by {err:.2e} (relative)"
    return None


def self_test(cm, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
    """Run the loaded module on the stored example inputs; its outputs must match the stored ones."""
    try:
        with torch.no_grad():
            got = cm(*[t.clone() for t in inputs])
    except Exception as exc:
        raise ArtifactError(
            f"the loaded model fails on the example inputs stored with it ({type(exc).__name__}: "
            f"{str(exc)[:300]}): tampered or corrupted artifact, re-save it"
        ) from None
    problem = compare_outputs(got, outputs)
    if problem is not None:
        raise ArtifactError(
            f"the loaded model does not reproduce the outputs recorded at save time ({problem}): "
            f"tampered or corrupted artifact, re-save it"
        )
