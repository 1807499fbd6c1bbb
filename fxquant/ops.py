"""Lowered fxquant ops: the modules a lowered graph calls in place of aten.linear / aten.conv*.

Each op holds its `QuantizedWeight` (tables, table indices and scales as buffers; the codes
bit-packed, see `_QWeightStore`) and runs either the pure-PyTorch reference (always available) or
a compiled kernel attached by the codegen pass. Once a kernel that holds every code is attached,
the op keeps only the kernel's packed copy and the reference path unpacks from it on demand.

Example:
    >>> import torch
    >>> from fxquant.qweight import QuantizedWeight
    >>> op = LowbitLinear(QuantizedWeight.uniform_symmetric(torch.randn(4, 16), 4), bias=None)
    >>> op(torch.randn(2, 16)).shape
    torch.Size([2, 4])
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .graphutil import conv_output_size
from .kv_rows import RowsMemo, kv_int8_per_row  # noqa: F401 - kv_int8_per_row: re-exported
from .qweight import (PackedCodes, QuantizedWeight, dequantize, format_bytes, quantize_activation_per_row,
                      reference_linear)

EPILOGUES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


def apply_epilogue(y: torch.Tensor, epilogue: str | None) -> torch.Tensor:
    return y if epilogue is None else EPILOGUES[epilogue](y)


class LoweredOp(nn.Module):
    """Base of every module a lowered graph calls; artifacts store and load only these."""


_PACKED_BY_CODES: dict[int, tuple[weakref.ref, PackedCodes]] = {}


def _pack_shared(codes: torch.Tensor, bits: int) -> PackedCodes:
    """PackedCodes of a codes tensor; ops built from the same tensor (tied weights) share one packed copy."""
    hit = _PACKED_BY_CODES.get(id(codes))
    if hit is not None and hit[0]() is codes and hit[1].bits == bits:
        return hit[1]
    packed = PackedCodes.from_codes(codes, bits)
    key = id(codes)
    _PACKED_BY_CODES[key] = (weakref.ref(codes, lambda _, key=key: _PACKED_BY_CODES.pop(key, None)), packed)
    return packed


def kernel_tensors(kernel) -> list[torch.Tensor]:
    """Tensors a kernel object keeps: its attributes, walking into containers and fxquant / codegen objects
    (a Packed, a wrapped linear kernel), not into modules or foreign objects (ctypes libraries)."""
    found, todo, seen = [], [kernel], set()
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, PackedCodes):
            found.append(obj.data)
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
        elif not isinstance(obj, (nn.Module, type)) and hasattr(obj, "__dict__") and \
                type(obj).__module__.split(".")[0] in ("codegen", "fxquant"):
            todo.extend(vars(obj).values())
    return found


class _QWeightStore(LoweredOp):
    """Holds a QuantizedWeight: table, table_index and scales as buffers, the codes bit-packed.

    `packed_codes` (a PackedCodes) is the only copy of the codes: the `pack_bits` stream, or, once
    a kernel holding every code is attached (`kernel.packed_codes`), the kernel's own copy.
    `codes` unpacks to uint8 [N, K] on demand; `code_shape` is (N, K) without unpacking.
    `register_buffer("codes", t)` and state_dict keep taking and giving uint8 [N, K] codes, and
    `artifact_tensors()` lists them beside the buffers, so artifacts store what they always stored.
    """

    def _store(self, qw: QuantizedWeight) -> None:
        self.bits, self.group_size = qw.bits, qw.group_size
        self.scheme, self.granularity = qw.scheme, qw.granularity
        for name in ("table", "table_index", "scales"):
            self.register_buffer(name, getattr(qw, name))
        self._set_codes(qw.codes)

    def _set_codes(self, codes: torch.Tensor | PackedCodes) -> None:
        """Take the codes as uint8 [N, K] (packed here) or a PackedCodes of this op's bit width (kept)."""
        if isinstance(codes, PackedCodes):
            if codes.bits != self.bits:
                raise ValueError(f"packed codes have {codes.bits} bits, the op {self.bits}")
            self.__dict__["_packed_codes"] = codes
            return
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() != 2:
            got = getattr(codes, "dtype", type(codes))
            raise ValueError(f"codes must be a uint8 [N, K] tensor, got {got}")
        self.__dict__["_packed_codes"] = _pack_shared(codes, self.bits)

    def register_buffer(self, name: str, tensor: torch.Tensor | PackedCodes | None,
                        persistent: bool = True) -> None:
        if name == "codes":
            return self._set_codes(tensor)
        super().register_buffer(name, tensor, persistent)

    @property
    def packed_codes(self) -> PackedCodes:
        return self.__dict__["_packed_codes"]

    @property
    def codes(self) -> torch.Tensor:
        return self.packed_codes.unpack()

    @property
    def code_shape(self) -> tuple[int, int]:
        return self.packed_codes.shape

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.bits, self.codes, self.table, self.table_index, self.scales,
                               self.group_size, self.scheme, self.granularity)

    def nbytes(self) -> int:
        """Deployed bytes of the weight format (= qweight.nbytes(), without unpacking the codes)."""
        return format_bytes(self.code_shape, self.bits, self.table, self.table_index, self.scales)

    def artifact_tensors(self) -> dict[str, torch.Tensor | None]:
        """Buffers plus the unpacked codes: the tensors an artifact stores for this op."""
        return {"codes": self.codes, **self._buffers}

    def resident_tensors(self) -> list[torch.Tensor]:
        """Every tensor this op and its attached kernel keep in memory (shared storages may repeat)."""
        found = [t for t in self._buffers.values() if t is not None] + [self.packed_codes.data]
        return found + kernel_tensors(self.__dict__.get("_kernel"))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "codes"] = self.codes

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "codes"
        if key in state_dict:
            self._set_codes(state_dict[key])
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def is_lowered(module: nn.Module) -> bool:
    """True for fxquant's lowered ops (every module holding a QuantizedWeight)."""
    return isinstance(module, _QWeightStore)


class _LowbitBase(_QWeightStore):
    """Shared storage of a quantized weight + bias, the act format, an optional fused epilogue."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, act_bits: int | None = 8,
                 epilogue: str | None = None):
        super().__init__()
        if epilogue is not None and epilogue not in EPILOGUES:
            raise ValueError(f"unknown epilogue {epilogue!r}; choose one of {sorted(EPILOGUES)}")
        self._store(qw)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.act_bits = act_bits
        self.epilogue = epilogue
        self.kernel = None  # set by codegen
        self.backend = "reference"

    @property
    def kernel(self) -> Callable[..., torch.Tensor] | None:
        return self.__dict__.get("_kernel")

    @kernel.setter
    def kernel(self, kernel: Callable[..., torch.Tensor] | None) -> None:
        """Attach (or detach with None) a kernel; a kernel whose packed copy holds every code
        (`kernel.packed_codes`) becomes the op's only copy of the codes."""
        held = getattr(kernel, "packed_codes", None)
        current = self.__dict__.get("_packed_codes")
        if isinstance(held, PackedCodes) and current is not None and held.shape == current.shape \
                and held.bits == current.bits:
            self.__dict__["_packed_codes"] = held
        elif current is not None and current.layout != "bits":  # leaving a kernel's copy: to a bit stream
            self.__dict__["_packed_codes"] = PackedCodes.from_codes(current.unpack(), current.bits)
        self.__dict__["_kernel"] = kernel

    def extra_repr(self) -> str:
        n, k = self.code_shape
        return (f"{k}->{n}, bits={self.bits}, {self.scheme}/{self.granularity}, group={self.group_size}, "
                f"act_bits={self.act_bits}, epilogue={self.epilogue}, backend={self.backend}")


def layer_norm_f64(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    """LayerNorm over the last dim in float64, rounded to float32 once (the fused kernels' math)."""
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    var = (xd - mean).square().mean(-1, keepdim=True)
    y = (xd - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y.float()


class LowbitLinear(_LowbitBase):
    """Quantized linear: y = epilogue(LN(x) @ W_hat^T + b) + residual.

    LN (a fused LayerNorm prologue, `fuse_layer_norm`) and the residual add (`residual = True`, the
    residual passed as forward's second argument) are optional; passes fuse-layernorm and
    fuse-residual set them so that one kernel call replaces three ops.
    """

    ln_eps: float | None = None   # class defaults: plain ops (and older artifacts) have no fusions
    residual: bool = False

    def fuse_layer_norm(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> None:
        self.register_buffer("ln_weight", None if weight is None else weight.detach().float().clone())
        self.register_buffer("ln_bias", None if bias is None else bias.detach().float().clone())
        self.ln_eps = float(eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel is not None:
            if not self.residual:
                return self.kernel(x)
            return self.kernel(x, residual=residual.float().contiguous())
        return self.reference(x, residual)

    def reference(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        h = x if self.ln_eps is None else layer_norm_f64(x, self.ln_weight, self.ln_bias, self.ln_eps)
        y = apply_epilogue(reference_linear(h, self.qweight, self.bias, self.act_bits), self.epilogue)
        if self.residual:
            y = y + residual.float()
        return y.to(x.dtype)


class LowbitConv(_LowbitBase):
    """Quantized conv1d/conv2d; the weight is stored flattened as [C_out, C_in/groups * prod(kernel)].

    groups == 1 runs as im2col + the quantized linear semantics; grouped/depthwise convs use the
    dequantized weight with float activations (weight-only semantics).
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, weight_shape: tuple[int, ...],
                 stride, padding, dilation, groups: int, act_bits: int | None = 8,
                 epilogue: str | None = None):
        super().__init__(qw, bias, act_bits if groups == 1 else None, epilogue)
        self.weight_shape = tuple(weight_shape)
        self.dims = len(weight_shape) - 2
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups != 1 or self.act_bits is None:
            w = dequantize(self.qweight).view(self.weight_shape)
            conv = F.conv1d if self.dims == 1 else F.conv2d
            y = conv(x.float(), w, self.bias, self.stride, self.padding, self.dilation, self.groups)
            return apply_epilogue(y, self.epilogue).to(x.dtype)
        x4 = x if self.dims == 2 else x.unsqueeze(2)
        ks = self.weight_shape[2:] if self.dims == 2 else (1, self.weight_shape[2])
        if self.dims == 2:
            stride, padding, dilation = tuple(self.stride), tuple(self.padding), tuple(self.dilation)
        else:
            stride, padding, dilation = (1, self.stride[0]), (0, self.padding[0]), (1, self.dilation[0])
        n, _, h, w_in = x4.shape
        cols = F.unfold(x4.float(), ks, dilation=dilation, padding=padding, stride=stride)  # [N, CK, L]
        oh = conv_output_size(h, ks[0], stride[0], padding[0], dilation[0])
        ow = conv_output_size(w_in, ks[1], stride[1], padding[1], dilation[1])
        y = reference_linear(cols.transpose(1, 2), self.qweight, self.bias, self.act_bits)  # [N, L, Cout]
        y = apply_epilogue(y, self.epilogue).transpose(1, 2)
        y = y.reshape(n, -1, oh, ow) if self.dims == 2 else y.reshape(n, -1, ow)
        return y.to(x.dtype)


class LowbitEmbedding(_QWeightStore):
    """Embedding lookup into a quantized table: row t of W_hat for every token t.

    Used for tied tables (Whisper's token embedding doubles as the logits projection): the lookup
    shares the packed codes, tables and scales of the projection's LowbitLinear, so the float table
    is no longer needed.
    """

    def __init__(self, qw: QuantizedWeight, padding_idx: int | None = None):
        super().__init__()
        self._store(qw)
        self.padding_idx = padding_idx
        self.kernel = None                       # set by codegen (attach_kernels)
        self.backend = "reference"

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kernel = self.__dict__.get("kernel")      # codegen.embedding_rows: the same bits in one C call
        if kernel is not None and self.packed_codes.layout == "bits":
            return kernel(self, tokens)
        return self.reference(tokens)

    def reference(self, tokens: torch.Tensor) -> torch.Tensor:
        k, gs = self.code_shape[1], self.group_size
        codes = self.packed_codes.rows(tokens)                              # [..., K] uint8, only these rows
        if self.table.shape[0] == 1 and k % gs == 0:  # one shared level table (uniform formats): 5 ops
            levels = self.table[0][codes.long()]                                             # [..., K] int8
            scales = F.embedding(tokens, self.scales)[..., None]
            scaled = levels.view(*tokens.shape, k // gs, gs).float() * scales
            return scaled.view(*tokens.shape, k)
        codes = codes.long()                                                # [..., K]
        tabs = self.table_index[tokens].long().repeat_interleave(self.group_size, -1)[..., :k]
        scales = self.scales[tokens].repeat_interleave(self.group_size, -1)[..., :k]
        return self.table[tabs, codes].float() * scales

    def extra_repr(self) -> str:
        n, k = self.code_shape
        return f"{n} x {k}, bits={self.bits}, {self.scheme}/{self.granularity}, group={self.group_size}"


class FusedAttention(LoweredOp):
    """scaled_dot_product_attention(q, k, v, mask) as one op; a generated C kernel serves decode shapes.

    The kernel runs when a call has at most `max_query_rows` query rows (decoding: one token, or a
    short prompt) and skips keys whose mask entry is -inf, so a fixed-size KV cache costs only its
    filled part. Longer queries (an encoder's self-attention) use torch's SDPA.

    kv_int8=True (set by lower-attention for keys/values that are unmodified graph inputs, such as
    Whisper's cross-attention cache): keys and values are used as per-row int8
    (`fxquant.kv_rows.quantize_rows`), converted once and reused while the same input tensor comes
    back unmodified (same tensor object, same version counter), so each decode step reads a
    quarter of the bytes. The reference path applies the same rounding. When the graph input itself
    is taken as int8 rows (pass int8-kv-inputs), the call passes the codes as k / v and their scales
    as key_scale / value_scale, and nothing is converted here.

    Example:
        >>> att = FusedAttention(head_dim=8)
        >>> att(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)).shape
        torch.Size([1, 2, 1, 8])
    """

    def __init__(self, head_dim: int, scale: float | None = None, max_query_rows: int = 16,
                 kv_int8: bool = False):
        super().__init__()
        self.head_dim, self.scale, self.max_query_rows = head_dim, scale, max_query_rows
        self.kv_int8 = kv_int8
        self.kernel: Callable[..., torch.Tensor] | None = None  # set by codegen
        self.backend = "reference"
        self._kv_memo = RowsMemo()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                key_scale: torch.Tensor | None = None,
                value_scale: torch.Tensor | None = None) -> torch.Tensor:
        use_kernel = (self.kernel is not None and q.shape[-2] <= self.max_query_rows
                      and q.dtype == torch.float32)
        if not self.kv_int8:
            if key_scale is not None or value_scale is not None:
                raise ValueError("key_scale / value_scale are for an op with int8 keys/values (kv_int8)")
            if use_kernel:
                return self.kernel(q, k, v, mask, self.scale)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        (kq, ks), (vq, vs) = self._int8("k", k, key_scale), self._int8("v", v, value_scale)
        if use_kernel:
            return self.kernel(q, kq, vq, mask, self.scale, key_scale=ks, value_scale=vs)
        return self._sdpa_int8(q, (kq, ks), (vq, vs), mask)

    def reference(self, q, k, v, mask=None, key_scale=None, value_scale=None) -> torch.Tensor:
        if self.kv_int8:
            k8 = (k, key_scale) if key_scale is not None else quantize_activation_per_row(k)
            v8 = (v, value_scale) if value_scale is not None else quantize_activation_per_row(v)
            return self._sdpa_int8(q, k8, v8, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _sdpa_int8(self, q, k8: tuple, v8: tuple, mask) -> torch.Tensor:
        """torch SDPA on per-row int8 keys/values (q_int8, scale) dequantized to q's dtype."""
        k, v = ((t.float() * s).to(q.dtype) for t, s in (k8, v8))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _int8(self, slot: str, t: torch.Tensor, scale: torch.Tensor | None) -> tuple:
        """(codes, scales): the caller's when it passed scales, else the memoized per-row int8 copy of `t`."""
        if scale is not None:
            if t.dtype != torch.int8:
                raise ValueError(f"attention {slot} given with a scale must be int8 codes, got {t.dtype}")
            return t, scale
        memo = self.__dict__.get("_kv_memo")
        if not isinstance(memo, RowsMemo):  # artifacts rebuild ops without __init__
            memo = self.__dict__["_kv_memo"] = RowsMemo()
        memo.quantizer = getattr(self.kernel, "quantize_rows", None)  # a kv-int8 C kernel's own: same bits
        return memo.get(slot, t)

    def forget_constant_kv(self) -> None:
        """Drop the int8 copies of the last keys / values (else they outlive them: 37 MiB for 8 windows)."""
        self.__dict__["_kv_memo"] = RowsMemo()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_kv_memo"] = RowsMemo()
        return state

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, scale={self.scale}, max_query_rows={self.max_query_rows}, " \
               f"kv_int8={self.kv_int8}, backend={self.backend}"
