"""propagate-shapes: run the graph once on the example inputs and record each node's shape and dtype.

Writes ir.SHAPE (tuple of ints, None for non-tensors) and ir.DTYPE ("float32", "tuple", ...).
The run uses fake tensors (torch's FakeTensorMode: shapes and dtypes, no arithmetic; 0.05 s instead of
0.4 s for Whisper tiny.en's encoder) and falls back to a real run when an op has no fake implementation
or a data-dependent output shape.

Example:
    propagate-shapes
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.graphutil import flat_inputs
from fxquant.registry import PassResult, register_pass


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[ir.SHAPE] = tuple(int(d) for d in result.shape)
            n.meta[ir.DTYPE] = str(result.dtype).replace("torch.", "")
        else:
            n.meta[ir.SHAPE] = None
            n.meta[ir.DTYPE] = type(result).__name__
        return result


def _run_fake(gm: fx.GraphModule, inputs: list) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
        _ShapeRecorder(gm).run(*fake)


@register_pass("propagate-shapes", kind="analysis")
def propagate_shapes(gm, ctx) -> PassResult:
    """Record concrete shapes/dtypes for ctx.example_inputs."""
    if not ctx.example_inputs:
        from fxquant.errors import ConfigError

        raise ConfigError("propagate-shapes needs example inputs (PassContext.example_inputs is empty)")
    inputs = flat_inputs(gm, ctx.example_inputs)
    with torch.no_grad():
        try:
            _run_fake(gm, inputs)
        except Exception:  # noqa: BLE001 - any op fake tensors cannot run: record the shapes of a real run
            _ShapeRecorder(gm).run(*inputs)
    n = sum(1 for node in gm.graph.nodes if node.meta.get(ir.SHAPE) is not None)
    return PassResult(changed=False, message=f"recorded shapes of {n} tensors")
