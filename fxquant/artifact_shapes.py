"""Shape rules of ATen ops on meta tensors, for the abstract run of a loaded artifact (artifact_check).

torch's own meta functions of pointwise ops, layer_norm, cat/stack and index_select/index_copy_ are Python
references that import torch._dynamo (about a second) on their first call; these rules give the same
shape and dtype by arithmetic (checked against torch over sweeps in tests/fxquant/test_artifact_check.py),
raise ValueError where torch would refuse the shapes, and return None where they do not know the dtype.

Example:
    >>> a, b = torch.empty(2, 1, 4, device="meta"), torch.empty(3, 1, device="meta")
    >>> out = shape_rule(torch.ops.aten.add.Tensor, (a, b), {})
    >>> tuple(out.shape), out.dtype, out.device.type
    ((2, 3, 4), torch.float32, 'meta')
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils import _pytree as pytree

META = torch.device("meta")


def to_meta(value: Any) -> Any:
    """Arguments with every device replaced by meta (a stored graph cannot make an op run for real)."""
    return pytree.tree_map(lambda v: META if isinstance(v, torch.device) else v, value)


_COMPARE = frozenset("eq ne lt le gt ge logical_and logical_or logical_xor logical_not isnan isinf isfinite "
                     "signbit".split())
_CLOSED = frozenset("add sub mul maximum minimum neg abs".split())   # result_type of the inputs, any dtype


def shape_rule(target: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The meta result of an ATen op by a rule here (pointwise ops: broadcasting and type promotion; the
    ops in SHAPE_RULES), or None when no rule knows the op or its dtype (the op then runs on meta)."""
    schema = getattr(target, "_schema", None)
    if schema is None or schema.name.split("::")[0] != "aten":
        return None
    name = schema.name.split("::")[1]
    if name == "arange":
        return _arange(*args, **kwargs)
    if kwargs.keys() - {"alpha"}:
        return None
    rule = SHAPE_RULES.get(f"{name}.{target._overloadname}")
    if rule is not None:
        return rule(*args)
    if name == "where" and len(args) == 3:
        operands = args[1:]
    elif torch.Tag.pointwise in target.tags and name in _COMPARE | _CLOSED or (
            torch.Tag.pointwise in target.tags and len(args) == 1):
        operands = args
    else:
        return None
    if not all(isinstance(a, (torch.Tensor, bool, int, float)) for a in args):
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(t.device != META for t in tensors):
        return None
    if name in _COMPARE:
        dtype = torch.bool
    elif len(operands) == 2:
        dtype = torch.result_type(*operands)
    elif name in _CLOSED or operands[0].is_floating_point():
        dtype = operands[0].dtype
    else:
        return None                          # a float op of an integer tensor: its meta function decides
    shape = broadcast_shapes(*(tuple(t.shape) for t in tensors))
    return torch.empty(shape, dtype=dtype, device=META)


def broadcast_shapes(*shapes: tuple) -> tuple[int, ...]:
    """torch.broadcast_shapes on int tuples (torch's imports sympy, about half a second); ValueError when
    the shapes do not broadcast.

    Example:
        >>> broadcast_shapes((2, 1, 4), (3, 1), ())
        (2, 3, 4)
    """
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for s in shapes:
        for i, d in enumerate(s, rank - len(s)):
            if d != 1:
                if out[i] not in (1, d):
                    raise ValueError(f"shapes {[tuple(x) for x in shapes][:4]} do not broadcast")
                out[i] = int(d)
    return tuple(out)


def _arange(*bounds, dtype=None, device=None, layout=None, pin_memory=None) -> torch.Tensor | None:
    """aten.arange(end) / (start, end) / (start, end, step) on meta: ceil((end - start) / step) elements."""
    if not 1 <= len(bounds) <= 3 or device != META or layout not in (None, torch.strided) or \
            not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
        return None
    start, end, step = (0, bounds[0], 1) if len(bounds) == 1 else (*bounds, 1)[:3]
    if step == 0 or not all(math.isfinite(b) for b in (start, end, step)) or (end - start) * step < 0:
        raise ValueError(f"arange({start}, {end}, {step}) has no finite length or steps away from its end")
    if dtype is None:
        ints = all(isinstance(b, int) for b in (start, end, step))
        dtype = torch.int64 if ints else torch.get_default_dtype()
    return torch.empty(math.ceil((end - start) / step), dtype=dtype, device=META)


def _layer_norm(x, normalized_shape, weight=None, bias=None, *_) -> torch.Tensor | None:
    """aten.layer_norm's shape rule: x's shape and dtype; the affine parameters have the normalized shape."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.device != META:
        return None
    shape = tuple(normalized_shape) if isinstance(normalized_shape, (list, tuple)) else None
    ok = shape is not None and 0 < len(shape) <= x.dim() and tuple(x.shape[x.dim() - len(shape):]) == shape
    for t in (weight, bias):
        ok = ok and (t is None or (isinstance(t, torch.Tensor) and tuple(t.shape) == shape))
    if not ok:
        raise ValueError(f"layer_norm over {normalized_shape} does not fit an input of {tuple(x.shape)}")
    return torch.empty(x.shape, dtype=x.dtype, device=META)


def _dim(d: Any, rank: int) -> int:
    if not isinstance(d, int) or isinstance(d, bool) or not -rank <= d < max(rank, 1):
        raise ValueError(f"dim {d!r} is out of range for {rank} dimensions")
    return d % max(rank, 1)


def _cat(tensors, dim=0, stack: bool = False) -> torch.Tensor | None:
    """aten.cat / aten.stack: equal shapes (cat: but along dim), one dtype."""
    if not isinstance(tensors, (list, tuple)) or not tensors or \
            not all(isinstance(t, torch.Tensor) and t.device == META for t in tensors):
        return None
    first = tensors[0]
    if any(t.dtype != first.dtype for t in tensors):
        return None                                      # type promotion: the meta function decides
    d = _dim(dim, first.dim() + stack)
    rest = [tuple(t.shape[:d]) + tuple(t.shape[d + (not stack):]) for t in tensors]
    if any(r != rest[0] for r in rest) or any(t.dim() != first.dim() for t in tensors):
        raise ValueError(f"{'stack' if stack else 'cat'} of shapes {[tuple(t.shape) for t in tensors][:4]}")
    size = len(tensors) if stack else sum(int(t.shape[d]) for t in tensors)
    return torch.empty((*rest[0][:d], size, *rest[0][d:]), dtype=first.dtype, device=META)


def _index_select(x, dim, index) -> torch.Tensor | None:
    if not (isinstance(x, torch.Tensor) and isinstance(index, torch.Tensor)) or index.dim() > 1 or \
            index.is_floating_point() or index.dtype == torch.bool:
        return None
    d = _dim(dim, x.dim())
    return torch.empty((*x.shape[:d], index.numel(), *x.shape[d + 1:]), dtype=x.dtype, device=META)


def _index_copy_(x, dim, index, source) -> torch.Tensor | None:
    """In place: x itself; source is x's shape with `dim` replaced by the number of indices."""
    if not all(isinstance(t, torch.Tensor) for t in (x, index, source)) or index.dim() > 1 or \
            index.is_floating_point() or index.dtype == torch.bool or source.dtype != x.dtype:
        return None
    d = _dim(dim, x.dim())
    if tuple(source.shape) != (*x.shape[:d], index.numel(), *x.shape[d + 1:]):
        raise ValueError(f"index_copy_ of {tuple(source.shape)} into {tuple(x.shape)} along {d}")
    return x


def _clamp(x, lo=None, hi=None) -> torch.Tensor | None:
    """x's shape and dtype when the bounds cannot promote it (a float tensor, or int bounds of an int one)."""
    bounds = [b for b in (lo, hi) if b is not None]
    if not isinstance(x, torch.Tensor) or x.dtype == torch.bool or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
        return None
    if not x.is_floating_point() and any(isinstance(b, float) for b in bounds):
        return None
    return torch.empty(x.shape, dtype=x.dtype, device=META)


SHAPE_RULES = {
    "clamp.default": _clamp,
    "layer_norm.default": _layer_norm,
    "cat.default": _cat,
    "stack.default": lambda tensors, dim=0: _cat(tensors, dim, stack=True),
    "index_select.default": _index_select,
    "index_copy_.default": _index_copy_,
}


def makes_tensors(target: Any) -> bool:
    """True for ATen ops with a keyword-only `device` argument (zeros, full, arange, _to_copy, ...)."""
    schema = getattr(target, "_schema", None)
    return schema is not None and any(a.name == "device" and a.kwarg_only for a in schema.arguments)
