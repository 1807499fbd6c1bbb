"""The call targets an artifact may name: the ops fxquant's graphs contain, nothing touching files/processes.

A compiled graph holds the ATen ops of the captured model that fxquant did not lower (layout
changes, norms, activations, the KV-cache updates of a decode step) plus `operator` functions on
sizes. The allow-list below is those ops (collected from the zoo, the acceptance models, Whisper
and BC-ResNet) and a curated list of pure ATen math, reduction, view and indexing ops. It names no
op that reads or writes files, starts processes, prints, sleeps or reads data-dependent output
sizes or hands out uninitialised memory (`aten.from_file`, `aten._print`, `aten.nonzero`, `aten.empty`, ...
are refused).

Example:
    >>> resolve_target("torch.ops.aten.relu.default", "graph.nodes[3].target")
    <OpOverload(op='aten.relu', overload='default')>
    >>> resolve_target("torch.ops.aten.from_file.default", "graph.nodes[3].target")
    Traceback (most recent call last):
    ...
    fxquant.errors.ArtifactError: manifest.json graph.nodes[3].target: 'aten.from_file' is not an op \
artifacts may call (pure tensor ops only): tampered artifact
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch

from .artifact_schema import fail

_MATH = """abs acos acosh add addcdiv addcmul addmm all amax amin any argmax argmin asin asinh atan atan2
atanh baddbmm bitwise_and bitwise_not bitwise_or bitwise_xor bmm ceil clamp clamp_max clamp_min
clip cos cosh cumprod cumsum div elu eq erf erfc exp exp2 expm1 floor floor_divide fmod frac ge
gelu glu gt hardsigmoid hardswish hardtanh isfinite isinf isnan le leaky_relu lerp lgamma log
log10 log1p log2 log_sigmoid log_softmax logical_and logical_not logical_or logical_xor logit
logsumexp lt masked_fill matmul max maximum mean min minimum mish mm mul mv nan_to_num ne neg
norm linalg_vector_norm pow prod prelu reciprocal relu relu6 remainder round rsqrt rsub sigmoid
sign signbit silu sin sinh softmax _softmax softplus sqrt square std sub sum tan tanh threshold
true_divide trunc var var_mean where xlogy einsum dot outer""".split()
_NN = """linear conv1d conv2d conv_transpose1d conv_transpose2d convolution _convolution batch_norm
_native_batch_norm_legit_no_training native_batch_norm layer_norm native_layer_norm group_norm
native_group_norm instance_norm rms_norm dropout feature_dropout alpha_dropout embedding
scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu lstm gru rnn_tanh
rnn_relu avg_pool1d avg_pool2d max_pool1d max_pool2d max_pool2d_with_indices adaptive_avg_pool1d
adaptive_avg_pool2d adaptive_max_pool1d adaptive_max_pool2d pad constant_pad_nd reflection_pad1d
reflection_pad2d replication_pad1d replication_pad2d upsample_nearest1d upsample_nearest2d
upsample_linear1d upsample_bilinear2d pixel_shuffle cosine_similarity pairwise_distance""".split()
_LAYOUT = """view reshape _unsafe_view view_as reshape_as permute transpose t contiguous clone flatten
unflatten squeeze unsqueeze expand expand_as repeat repeat_interleave tile slice slice_scatter
select select_scatter index_select index index_put index_put_ index_copy index_copy_ index_add
index_add_ gather scatter scatter_add narrow split split_with_sizes tensor_split chunk unbind
cat concat stack hstack vstack flip roll movedim diagonal triu tril alias detach lift_fresh_copy
_to_copy to type_as copy copy_ fill fill_ zero_ masked_fill_ zeros ones full zeros_like
ones_like full_like new_zeros new_ones new_full arange scalar_tensor sym_size sym_numel
sym_stride sym_storage_offset _assert_tensor_metadata _assert_scalar sort topk cumsum_ add_ sub_
mul_ div_ clamp_ copy_ unfold im2col col2im""".split()
ATEN_OPS = frozenset(_MATH + _NN + _LAYOUT)

OPERATOR_FUNCTIONS = frozenset(
    """getitem add sub mul truediv floordiv mod neg pow eq ne lt le gt ge and_ or_
not_ abs""".split()
)
SYM_FUNCTIONS = {
    "torch.sym_int": torch.sym_int,
    "torch.sym_float": torch.sym_float,
    "torch.sym_max": torch.sym_max,
    "torch.sym_min": torch.sym_min,
    "torch.sym_not": torch.sym_not,
}
_OVERLOAD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


def target_name(target: Any) -> str | None:
    """The manifest name of a call_function target, or None when artifacts cannot store it."""
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace == "aten" and target._schema.name.split("::")[1] in ATEN_OPS:
            return f"torch.ops.aten.{target._schema.name.split('::')[1]}.{target._overloadname}"
        return None
    if (
        getattr(target, "__module__", None) in ("_operator", "operator")
        and getattr(target, "__name__", None) in OPERATOR_FUNCTIONS
    ):
        return f"operator.{target.__name__}"
    for name, fn in SYM_FUNCTIONS.items():
        if target is fn:
            return name
    return None


def resolve_target(name: Any, where: str) -> Any:
    """The callable behind a manifest call target, from the allow-list only."""
    if not isinstance(name, str) or len(name) > 200:
        raise fail(where, f"a call target is a string naming an allowed op, got {type(name).__name__}")
    parts = name.split(".")
    if parts[:3] == ["torch", "ops", "aten"] and len(parts) == 5:
        if parts[3] not in ATEN_OPS:
            raise fail(
                where, f"'aten.{parts[3][:60]}' is not an op artifacts may call (pure tensor ops only)"
            )
        if not _OVERLOAD.match(parts[4]):
            raise fail(where, f"{parts[4][:60]!r} is not an overload name")
        packet = getattr(torch.ops.aten, parts[3], None)
        overload = (
            None
            if packet is None
            else getattr(packet, parts[4], None)
            if parts[4] in packet.overloads()
            else None
        )
        if not isinstance(overload, torch._ops.OpOverload):
            raise fail(
                where,
                f"ATen op {name!r} does not exist in torch {torch.__version__} (artifact from another "
                f"torch version? recompile it)",
            )
        return overload
    if len(parts) == 2 and parts[0] == "operator" and parts[1] in OPERATOR_FUNCTIONS:
        return getattr(operator, parts[1])
    if name in SYM_FUNCTIONS:
        return SYM_FUNCTIONS[name]
    raise fail(
        where,
        f"call target {name[:80]!r} is not allowed in an artifact (ATen tensor ops, operator "
        f"functions on sizes and fxquant's lowered ops only)",
    )
