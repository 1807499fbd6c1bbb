"""Lowered ops in an artifact: which classes may be rebuilt, their attributes (typed, ranged, enums),
their buffers, and the consistency of buffers with attributes (so a kernel never reads out of bounds).

Kernel sources are rendered from these attributes on load, so every value that reaches a C
template (N, K, bits, group size, epilogue, conv geometry) is checked here first.

Example:
    >>> sorted(c.rsplit(".", 1)[1] for c in CLASSES)[:4]
    ['FusedAttention', 'LowbitConv', 'LowbitEmbedding', 'LowbitLinear']
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .formats import quantized_formats
from .qweight import PackedCodes
from .artifact_schema import (MAX_DIM, decode_arg, fail, ident, want_dict, want_enum, want_float, want_int,
                              want_type)

CLASSES = (
    "fxquant.ops.LowbitLinear",
    "fxquant.ops.LowbitConv",
    "fxquant.ops.LowbitEmbedding",
    "fxquant.ops.FusedAttention",
    "fxquant.lowering.StaticLowbitLinear",
    "fxquant.lowering.StaticLowbitConv",
)


def _classes() -> dict[str, type]:
    from . import lowering, ops

    return {
        "fxquant.ops.LowbitLinear": ops.LowbitLinear,
        "fxquant.ops.LowbitConv": ops.LowbitConv,
        "fxquant.ops.LowbitEmbedding": ops.LowbitEmbedding,
        "fxquant.ops.FusedAttention": ops.FusedAttention,
        "fxquant.lowering.StaticLowbitLinear": lowering.StaticLowbitLinear,
        "fxquant.lowering.StaticLowbitConv": lowering.StaticLowbitConv,
    }


def class_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _optional(check: Callable) -> Callable:
    return lambda v, w: None if v is None else check(v, w)


def _ints(lo: int = 0, hi: int = 1 << 16) -> Callable:
    def check(v, w):
        want_type(v, (list, tuple), w)
        if not 1 <= len(v) <= 4:
            raise fail(w, f"expected 1 to 4 integers, got {len(v)}")
        return type(v)(want_int(x, f"{w}[{i}]", lo, hi) for i, x in enumerate(v))

    return check


_BITS = lambda v, w: want_int(v, w, 2, 8)  # noqa: E731
_QW_ATTRS = {
    "bits": _BITS,
    "group_size": lambda v, w: want_int(v, w, 1, MAX_DIM),
    "scheme": lambda v, w: want_enum(v, quantized_formats(), w),
    "granularity": lambda v, w: want_enum(v, ("tensor", "channel", "group"), w),
}


def _epilogue(v, w):
    from .ops import EPILOGUES

    return None if v is None else want_enum(v, tuple(EPILOGUES), w)


_LOWBIT_ATTRS = {
    **_QW_ATTRS,
    "act_bits": _optional(lambda v, w: want_enum(v, (8,), w)),
    "epilogue": _epilogue,
}
_LINEAR_ATTRS = {
    **_LOWBIT_ATTRS,
    "ln_eps": _optional(lambda v, w: want_float(v, w, 1e-30, 1.0)),
    "residual": lambda v, w: want_type(v, bool, w),
}
_CONV_ATTRS = {
    **_LOWBIT_ATTRS,
    "weight_shape": _ints(lo=1, hi=MAX_DIM - 1),
    "dims": lambda v, w: want_int(v, w, 1, 2),
    "stride": _ints(lo=1),
    "padding": _ints(lo=0),
    "dilation": _ints(lo=1),
    "groups": lambda v, w: want_int(v, w, 1, MAX_DIM),
}
_STATIC = {"act_mode": lambda v, w: want_enum(v, ("static",), w)}
_QW_BUFFERS = ("codes", "table", "table_index", "scales")

# class -> (attribute checks, required attributes, required buffers, optional buffers)
SPECS: dict[str, tuple[dict, tuple, tuple, tuple]] = {
    "fxquant.ops.LowbitLinear": (
        _LINEAR_ATTRS,
        tuple(_LOWBIT_ATTRS),
        _QW_BUFFERS,
        ("bias", "ln_weight", "ln_bias"),
    ),
    "fxquant.lowering.StaticLowbitLinear": (
        {**_LINEAR_ATTRS, **_STATIC},
        (*_LOWBIT_ATTRS, "act_mode"),
        (*_QW_BUFFERS, "act_scale"),
        ("bias", "ln_weight", "ln_bias"),
    ),
    "fxquant.ops.LowbitConv": (_CONV_ATTRS, tuple(_CONV_ATTRS), _QW_BUFFERS, ("bias",)),
    "fxquant.lowering.StaticLowbitConv": (
        {**_CONV_ATTRS, **_STATIC},
        (*_CONV_ATTRS, "act_mode"),
        (*_QW_BUFFERS, "act_scale"),
        ("bias",),
    ),
    "fxquant.ops.LowbitEmbedding": (
        {**_QW_ATTRS, "padding_idx": _optional(lambda v, w: want_int(v, w))},
        (*_QW_ATTRS, "padding_idx"),
        _QW_BUFFERS,
        (),
    ),
    "fxquant.ops.FusedAttention": (
        {
            "head_dim": lambda v, w: want_int(v, w, 1, 1 << 16),
            "scale": _optional(lambda v, w: want_float(v, w)),
            "max_query_rows": lambda v, w: want_int(v, w, 0, 1 << 20),
            "kv_int8": lambda v, w: want_type(v, bool, w),
        },
        ("head_dim", "scale", "max_query_rows", "kv_int8"),
        (),
        (),
    ),
}

# codegen's never_slower choice (codegen/never_slower.py): optional on every op that can carry a kernel
for _cls in (
    "fxquant.ops.LowbitLinear",
    "fxquant.lowering.StaticLowbitLinear",
    "fxquant.ops.LowbitConv",
    "fxquant.lowering.StaticLowbitConv",
    "fxquant.ops.FusedAttention",
):
    SPECS[_cls][0]["kernel_choice"] = lambda v, w: want_enum(v, ("torch",), w)


def module_attrs(cls_path: str, attrs: Any, where: str) -> dict[str, Any]:
    """Decode and check a lowered op's attributes against its class's schema."""
    checks, required, _, _ = SPECS[cls_path]
    want_dict(attrs, where, required=required, optional=tuple(checks))
    out = {}
    for key, raw in attrs.items():

        def no_nodes(name: str, key=key):
            raise fail(f"{where}.{key}", "an attribute cannot refer to a graph node")

        out[key] = checks[key](decode_arg(raw, f"{where}.{key}", no_nodes), f"{where}.{key}")
    return out


def module_buffers(cls_path: str, buffers: Any, where: str) -> dict[str, str | None]:
    """{buffer name: tensor name or None}, with the class's required buffers present."""
    _, _, required, optional = SPECS[cls_path]
    want_dict(buffers, where, required=required, optional=optional)
    for key, ref in buffers.items():
        if ref is None and key in required:
            raise fail(f"{where}.{key}", "this buffer cannot be empty")
        if ref is not None and not (isinstance(ref, str) and len(ref) <= 1000):
            raise fail(f"{where}.{key}", f"a buffer names a stored tensor, got {type(ref).__name__}")
    return dict(buffers)


def _tensor(t: torch.Tensor | None, where: str, dtype: torch.dtype, shape: tuple | None) -> None:
    if t is None:
        raise fail(where, "is missing")
    if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
        raise fail(
            where,
            f"needs a {str(dtype).replace('torch.', '')} tensor of shape {shape}, got "
            f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}",
        )


def check_consistency(
    cls_path: str, attrs: dict, bufs: dict[str, torch.Tensor | PackedCodes | None], where: str,
    code_bits: int | None = None
) -> None:
    """Buffers agree with the attributes: shapes, dtypes, code and table-index ranges, conv geometry.

    code_bits: the width the codes were bit-packed with in weights.bin (unpacking cannot produce a
    larger value, so then the codes need no scan)."""
    if cls_path == "fxquant.ops.FusedAttention":
        return
    codes = bufs["codes"]
    if isinstance(codes, PackedCodes):     # bit-packed as stored: values < 2**codes.bits by construction
        if 0 in codes.shape:
            raise fail(f"{where}.codes", "needs a non-empty [N, K] code stream")
        code_bits = codes.bits
    elif codes is None or codes.dim() != 2 or codes.dtype != torch.uint8 or 0 in codes.shape:
        raise fail(f"{where}.codes", "needs a non-empty uint8 [N, K] tensor")
    n, k = codes.shape
    bits, gs = attrs["bits"], attrs["group_size"]
    g = math.ceil(k / gs)
    _tensor(bufs["table"], f"{where}.table", torch.int8, None)
    table = bufs["table"]
    if table.dim() != 2 or table.shape[1] != 1 << bits or not 1 <= table.shape[0] <= n * g:
        raise fail(
            f"{where}.table", f"needs shape [T, {1 << bits}] with 1 <= T <= {n * g}, got {tuple(table.shape)}"
        )
    _tensor(bufs["scales"], f"{where}.scales", torch.float32, (n, g))
    _tensor(bufs["table_index"], f"{where}.table_index", torch.int32, (n, g))
    tidx = bufs["table_index"]
    if int(tidx.min()) < 0 or int(tidx.max()) >= table.shape[0]:
        raise fail(f"{where}.table_index", f"values must lie in [0, {table.shape[0]})")
    if code_bits is not None and code_bits != bits:
        raise fail(f"{where}.codes", f"are stored as {code_bits}-bit codes for a {bits}-bit op")
    if code_bits is None and int(codes.max()) >= 1 << bits:
        raise fail(f"{where}.codes", f"values must lie in [0, {1 << bits}) for {bits}-bit codes")
    if bufs.get("bias") is not None:
        _tensor(bufs["bias"], f"{where}.bias", torch.float32, (n,))
    if "act_scale" in bufs:
        _tensor(bufs["act_scale"], f"{where}.act_scale", torch.float32, None)
        s = bufs["act_scale"]
        if s.numel() != 1 or not (math.isfinite(float(s.reshape(-1)[0])) and float(s.reshape(-1)[0]) > 0):
            raise fail(f"{where}.act_scale", "needs one finite positive scale")
    for name in ("ln_weight", "ln_bias"):
        if bufs.get(name) is not None:
            if attrs.get("ln_eps") is None:
                raise fail(f"{where}.{name}", "a LayerNorm buffer needs ln_eps")
            _tensor(bufs[name], f"{where}.{name}", torch.float32, (k,))
    if "weight_shape" in attrs:
        _check_conv(attrs, n, k, where)
    if "padding_idx" in attrs and attrs["padding_idx"] is not None and not -n <= attrs["padding_idx"] < n:
        raise fail(f"{where}.padding_idx", f"must lie in [{-n}, {n})")


def _check_conv(attrs: dict, n: int, k: int, where: str) -> None:
    ws, dims, groups = attrs["weight_shape"], attrs["dims"], attrs["groups"]
    if len(ws) != dims + 2 or ws[0] != n or math.prod(ws[1:]) != k:
        raise fail(f"{where}.weight_shape", f"{list(ws)} does not match {dims}-D conv codes [{n}, {k}]")
    for key in ("stride", "padding", "dilation"):
        if len(attrs[key]) != dims:
            raise fail(f"{where}.{key}", f"needs {dims} values, got {len(attrs[key])}")
    if n % groups:
        raise fail(f"{where}.groups", f"{groups} does not divide the {n} output channels")
    if groups != 1 and attrs["act_bits"] is not None:
        raise fail(f"{where}.act_bits", "grouped convs run with float activations (act_bits None)")


def build_module(cls_path: str, attrs: dict, bufs: dict[str, torch.Tensor | None]) -> nn.Module:
    """A lowered op with these (checked) attributes and buffers, on the reference path."""
    cls = _classes()[cls_path]
    mod = cls.__new__(cls)
    nn.Module.__init__(mod)
    for key, value in attrs.items():
        setattr(mod, key, value)
    for key, t in bufs.items():
        mod.register_buffer(key, t)
    mod.kernel, mod.backend = None, "reference"
    return mod


def op_tensors(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """The tensors an artifact stores for a lowered op: its buffers and its (unpacked) codes."""
    tensors = getattr(module, "artifact_tensors", None)
    return dict(tensors()) if callable(tensors) else dict(module._buffers)


def plain_attrs(module: nn.Module) -> dict[str, Any]:
    """The module's own attributes to store (skipping runtime state such as the attached kernel)."""
    return {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_") and k not in ("training", "kernel", "backend")
    }


def check_name(name: Any, where: str) -> str:
    """A lowered op's name: one identifier (it becomes a file name for its kernel source)."""
    return ident(name, where)
