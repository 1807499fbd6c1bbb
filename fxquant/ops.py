"""Lowered fxquant ops: the modules a lowered graph calls in place of aten.linear / aten.conv*.

Each op holds its `QuantizedWeight` as buffers (so `state_dict` carries it) and runs either the
pure-PyTorch reference (always available) or a compiled kernel attached by the codegen pass.

Example:
    >>> import torch
    >>> from fxquant.qweight import QuantizedWeight
    >>> op = LowbitLinear(QuantizedWeight.uniform_symmetric(torch.randn(4, 16), 4), bias=None)
    >>> op(torch.randn(2, 16)).shape
    torch.Size([2, 4])
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .qweight import QuantizedWeight, dequantize, reference_linear

EPILOGUES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


def apply_epilogue(y: torch.Tensor, epilogue: str | None) -> torch.Tensor:
    return y if epilogue is None else EPILOGUES[epilogue](y)


class _QWeightStore(nn.Module):
    """Holds a QuantizedWeight's tensors as buffers (so state_dict and artifacts carry them)."""

    def _store(self, qw: QuantizedWeight) -> None:
        self.bits, self.group_size = qw.bits, qw.group_size
        self.scheme, self.granularity = qw.scheme, qw.granularity
        for name in ("codes", "table", "table_index", "scales"):
            self.register_buffer(name, getattr(qw, name))

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.bits, self.codes, self.table, self.table_index, self.scales,
                               self.group_size, self.scheme, self.granularity)


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
        self.kernel: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by codegen
        self.backend = "reference"

    def extra_repr(self) -> str:
        n, k = self.codes.shape
        return (f"{k}->{n}, bits={self.bits}, {self.scheme}/{self.granularity}, group={self.group_size}, "
                f"act_bits={self.act_bits}, epilogue={self.epilogue}, backend={self.backend}")


class LowbitLinear(_LowbitBase):
    """Quantized linear: y = epilogue(x @ W_hat^T + b)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        y = reference_linear(x, self.qweight, self.bias, self.act_bits)
        return apply_epilogue(y, self.epilogue).to(x.dtype)


class LowbitConv(_LowbitBase):
    """Quantized conv1d/conv2d; the weight is stored flattened as [C_out, C_in/groups * prod(kernel)].

    groups == 1 runs as im2col + the quantized linear semantics; grouped/depthwise convs use the
    dequantized weight with float activations (weight-only semantics).
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, weight_shape: tuple[int, ...],
                 stride, padding, dilation, groups: int, act_bits: int | None = 8, epilogue: str | None = None):
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
        oh = (h + 2 * padding[0] - dilation[0] * (ks[0] - 1) - 1) // stride[0] + 1
        ow = (w_in + 2 * padding[1] - dilation[1] * (ks[1] - 1) - 1) // stride[1] + 1
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
        self.backend = "reference"

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        k = self.codes.shape[1]
        codes = self.codes[tokens].long()                                   # [..., K]
        tabs = self.table_index[tokens].long().repeat_interleave(self.group_size, -1)[..., :k]
        scales = self.scales[tokens].repeat_interleave(self.group_size, -1)[..., :k]
        return self.table[tabs, codes].float() * scales

    def extra_repr(self) -> str:
        n, k = self.codes.shape
        return f"{n} x {k}, bits={self.bits}, {self.scheme}/{self.granularity}, group={self.group_size}"
