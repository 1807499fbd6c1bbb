"""lower-attention (transform): aten.scaled_dot_product_attention -> FusedAttention op (C kernels: decode, encoder).

Each float32, 4-D, dropout-free, non-causal SDPA call becomes a call to a `FusedAttention` submodule
(named after its module path + "_attention"). The codegen pass then attaches a generated kernel that
serves calls with at most `max_query_rows` query rows (one decoded token or a short prompt), reads
keys/values in place through their strides and skips keys masked with -inf, so attending over a
fixed-size KV cache costs only its filled slots. Longer queries keep torch's SDPA, except unmasked
calls (an encoder's self-attention) when `prefill_rows` > 0: their op serves up to that many query rows
with the kernel's bf16 flash-attention path (codegen/templates/attention_prefill.c.j2; never_slower
still keeps torch where that is faster). Keys/values that are views of a graph input the graph never
writes (Whisper's cross-attention cache) are read as
per-row int8 (option constant_kv), converted once and reused while the caller passes the same
unmodified tensor: a decode step then reads a quarter of their bytes. Calls the kernel
cannot serve (causal flag, dropout, grouped-query heads, non-float32, unknown head size) stay aten
ops, with the reason in their provenance.

Example:
    ...,lower,lower-attention,codegen
    lower-attention{max_query_rows=1}    # only single-token decode calls use the kernel
    lower-attention{constant_kv=float32} # keep constant keys/values in float32 (or compile option kv_bits=None)
    lower-attention{prefill_rows=0}      # encoder (unmasked, many-row) calls keep torch's fp32 SDPA
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxquant import ir
from fxquant.errors import ConfigError
from fxquant.graphutil import LAYOUT_OPS, fresh_submodule_name
from fxquant.ops import FusedAttention
from fxquant.registry import PassResult, register_pass

PASS = "lower-attention"
aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


KV_FORMATS = ("int8", "float32")
MAX_ROWS = 1 << 20  # the artifact schema's bound on FusedAttention.max_query_rows


@dataclass
class LowerAttentionOptions:
    max_query_rows: int = 16     # calls with more query rows run torch's SDPA
    constant_kv: str = "int8"    # keys/values that are unmodified graph inputs: "int8" (per row) or "float32"
    prefill_rows: int = 1 << 16  # unmasked calls with more query rows use the bf16 prefill kernel up to this; 0: off


def _input_root(node) -> fx.Node | None:
    """The placeholder a tensor is a pure view of (select/slice/view/transpose... chains), else None."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in LAYOUT_OPS:
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "placeholder" else None


def _mutated_inputs(gm: fx.GraphModule) -> set[fx.Node]:
    """Placeholders some in-place op of the graph writes to (through any view chain)."""
    out = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and node.target._schema.is_mutable:
            for arg, spec in zip(node.args, node.target._schema.arguments):
                if spec.alias_info is not None and spec.alias_info.is_write and (root := _input_root(arg)):
                    out.add(root)
    return out


def _call_args(node: fx.Node) -> dict:
    args = dict(zip(_ARG_NAMES, node.args))
    args.update(node.kwargs)
    return args


def _fake(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _prefill_rows(args: dict, opts: LowerAttentionOptions) -> int:
    """max_query_rows for the op: opts.prefill_rows for an unmasked call whose query rows are dynamic or more
    than opts.max_query_rows, else opts.max_query_rows (the kernel picks its path per call from the row count)."""
    lq = _fake(args["query"]).shape[-2]
    if opts.prefill_rows and args.get("attn_mask") is None and not (isinstance(lq, int) and lq <= opts.max_query_rows):
        return max(opts.prefill_rows, opts.max_query_rows)
    return opts.max_query_rows


def _why_not(args: dict) -> str | None:
    """None when the kernel can serve this call, else the reason it stays an aten op."""
    if float(args.get("dropout_p", 0.0) or 0.0) != 0.0:
        return "dropout_p != 0"
    if args.get("is_causal", False):
        return "is_causal=True (pass an explicit mask to use the kernel)"
    if args.get("enable_gqa", False):
        return "grouped-query heads (enable_gqa)"
    q, k, v = (_fake(args.get(n)) for n in ("query", "key", "value"))
    if q is None or k is None or v is None:
        return "query/key/value shapes unknown (no 'val' meta)"
    if not q.dim() == k.dim() == v.dim() == 4:
        return f"ranks {q.dim()}/{k.dim()}/{v.dim()} (the kernel takes 4-D (B, H, L, D))"
    if not q.dtype == k.dtype == v.dtype == torch.float32:
        return f"dtype {q.dtype} (the kernel is float32)"
    if not isinstance(q.shape[-1], int) or q.shape[-1] != k.shape[-1] or q.shape[-1] != v.shape[-1]:
        return "head sizes of query/key/value differ or are dynamic"
    return None


@register_pass(PASS, options=LowerAttentionOptions, kind="transform")
def lower_attention(gm: fx.GraphModule, ctx) -> PassResult:
    """Replace eligible scaled_dot_product_attention calls by FusedAttention submodules."""
    opts = ctx.options or LowerAttentionOptions()
    if opts.max_query_rows < 1:
        raise ConfigError(f"{PASS}: max_query_rows must be >= 1, got {opts.max_query_rows}")
    if opts.constant_kv not in KV_FORMATS:
        raise ConfigError(f"{PASS}: constant_kv must be one of {KV_FORMATS}, got {opts.constant_kv!r}")
    if not 0 <= opts.prefill_rows <= MAX_ROWS:
        raise ConfigError(f"{PASS}: prefill_rows must be in [0, {MAX_ROWS}], got {opts.prefill_rows}")
    constant_kv = "float32" if "kv_bits" in (ctx.config or {}) and ctx.config["kv_bits"] is None else opts.constant_kv
    mutated = _mutated_inputs(gm)
    lowered = kept = int8 = prefill = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not SDPA:
            continue
        args = _call_args(node)
        reason = _why_not(args)
        if reason:
            ir.add_provenance(node, PASS, f"left as aten: {reason}")
            kept += 1
            continue
        head_dim = int(_fake(args["query"]).shape[-1])
        roots = [_input_root(args[n]) for n in ("key", "value")]
        kv_int8 = constant_kv == "int8" and all(r is not None and r not in mutated for r in roots)
        int8 += kv_int8
        rows = opts.max_query_rows if kv_int8 else _prefill_rows(args, opts)  # no int8 prefill path
        prefill += rows > opts.max_query_rows
        name = fresh_submodule_name(gm, (ir.module_of(node) or node.name) + "_attention")
        gm.add_submodule(name, FusedAttention(head_dim, args.get("scale"), rows, kv_int8))
        call_args = (args["query"], args["key"], args["value"], args.get("attn_mask"))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, call_args if call_args[-1] is not None else call_args[:3])
        ir.copy_meta(node, new)
        ir.add_provenance(new, PASS, f"scaled_dot_product_attention -> FusedAttention(head_dim={head_dim})"
                      + (f"; keys/values are the unmodified input {roots[0].name}: int8 per row, converted "
                         f"once per input" if kv_int8 else "")
                      + (f"; unmasked, {_fake(args['query']).shape[-2]} query rows: prefill kernel (bf16) "
                         f"up to {rows} rows" if rows > opts.max_query_rows else ""))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        lowered += 1
    gm.recompile()
    message = (f"{lowered} attention calls lowered ({int8} with constant int8 keys/values, {prefill} prefill)"
               + (f", {kept} left as aten (see provenance)" if kept else ""))
    return PassResult(changed=lowered > 0, message=message)
