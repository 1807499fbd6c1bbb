"""How a quantizable graph node (aten.linear / conv1d / conv2d) maps onto the [N, K] weight contract.

A linear weight [N, K] is used as is; a conv weight [C_out, C_in/groups, *kernel] is flattened to
[C_out, C_in/groups * prod(kernel)] (channel-major, the order `F.unfold` produces), so its input
"rows" are im2col patches.

Example:
    >>> import torch
    >>> x = torch.randn(2, 3, 8, 8)
    >>> conv_rows(x, (3, 3), (1, 1), (1, 1), (1, 1), groups=1).shape
    torch.Size([128, 27])
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import ir

aten = torch.ops.aten


def describe(node: fx.Node) -> str:
    """"node 'conv2d_3' (module 't1.f2.0')" for error messages."""
    return f"node {node.name!r} (module {ir.module_of(node) or '<root>'!r})"


def conv_args(node: fx.Node) -> tuple[tuple, tuple, tuple, int]:
    """(stride, padding, dilation, groups) of an aten.conv1d/conv2d node, defaults filled in."""
    dims = 1 if node.target == aten.conv1d.default else 2
    names = ("stride", "padding", "dilation", "groups")
    defaults = ([1] * dims, [0] * dims, [1] * dims, 1)
    vals = []
    for i, (name, default) in enumerate(zip(names, defaults)):
        v = node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(name, default)
        if name != "groups":
            v = tuple(v) if isinstance(v, (list, tuple)) else (v,) * dims
            if len(v) == 1 and dims == 2:
                v = v * 2
        vals.append(v)
    return vals[0], vals[1], vals[2], int(vals[3])


def op_type(node: fx.Node, weight: torch.Tensor | None = None) -> str:
    """'linear', 'conv1d', 'conv2d' or 'depthwise' (a conv with groups == C_in > 1)."""
    if node.target in ir.LINEAR_TARGETS:
        return "linear"
    groups = conv_args(node)[3]
    if groups > 1 and weight is not None and weight.shape[1] == 1:
        return "depthwise"
    return "conv1d" if node.target == aten.conv1d.default else "conv2d"


def bias_of(node: fx.Node):
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return b


def conv_rows(x: torch.Tensor, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple,
              groups: int) -> torch.Tensor:
    """im2col rows [M, C_in/groups * prod(kernel)] of a conv input (groups stacked as extra rows)."""
    if x.dim() == 3:  # conv1d as a (1, k) conv2d
        x = x.unsqueeze(2)
        kernel, stride, padding, dilation = (1, kernel[0]), (1, stride[0]), (0, padding[0]), (1, dilation[0])
    cols = F.unfold(x.float(), tuple(kernel), dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
    b, ck, length = cols.shape
    k = ck // groups
    return cols.view(b, groups, k, length).permute(0, 3, 1, 2).reshape(-1, k)


def input_rows(node: fx.Node, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Rows [M, K] the flattened weight multiplies: the last dim for linear, im2col patches for conv."""
    if node.target in ir.LINEAR_TARGETS:
        return x.reshape(-1, x.shape[-1]).float()
    stride, padding, dilation, groups = conv_args(node)
    return conv_rows(x, tuple(weight.shape[2:]), stride, padding, dilation, groups)


def run_node(node: fx.Node, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Execute the node's op on x with a given (e.g. dequantized) weight."""
    if node.target in ir.LINEAR_TARGETS:
        return F.linear(x, weight, bias)
    stride, padding, dilation, groups = conv_args(node)
    fn = F.conv1d if node.target == aten.conv1d.default else F.conv2d
    return fn(x, weight, bias, stride, padding, dilation, groups)
