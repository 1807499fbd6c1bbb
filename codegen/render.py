"""Render specialized C sources from the jinja2 templates in codegen/templates/.

Every generated source comes from a template; this module only builds the template context
(N, K, group size, bits, the level table literal, epilogue, layout parameters) for one op.

Example:
    >>> import torch
    >>> from fxquant.qweight import QuantizedWeight
    >>> qw = QuantizedWeight.uniform_symmetric(torch.randn(13, 70), bits=4, group_size=32)
    >>> src = render_linear(qw, "portable", has_bias=False, epilogue=None, act_bits=8)[1]
    >>> "#define FX_N 13" in src
    True
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import jinja2

from fxquant.qweight import QuantizedWeight

from .kernel_table import UnsupportedOp, kernel_for
from .packing import LITERAL_MAX_BYTES, PLANES, TableInfo, analyze_tables, padded_group
from .targets import tuning

TEMPLATES = Path(__file__).parent / "templates"
__all__ = [
    "LITERAL_MAX_BYTES",
    "UnsupportedOp",
    "render",
    "render_linear",
    "render_conv_grouped",
    "kernel_name",
]


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def render(template: str, **ctx) -> str:
    return environment().get_template(template).render(**ctx)


def kernel_name(
    kind: str, target: str, qw: QuantizedWeight, act_bits: int | None, ln: bool = False, res: bool = False
) -> str:
    """e.g. linear_avx512_w4g64 (g = group size, 'c' for per-channel), suffix _f32 for weight-only,
    _ln for a fused LayerNorm prologue, _res for a fused residual add."""
    k = qw.codes.shape[1]
    g = "c" if qw.group_size >= k else str(qw.group_size)
    return (
        f"{kind}_{target}_w{qw.bits}g{g}"
        + ("" if act_bits == 8 else "_f32")
        + ("_ln" if ln else "")
        + ("_res" if res else "")
    )


def _base_context(
    qw: QuantizedWeight,
    gsp: int,
    has_bias: bool,
    epilogue: str | None,
    ln_eps: float | None = None,
    has_res: bool = False,
) -> dict:
    n, k = qw.codes.shape
    small = qw.table.numel() <= LITERAL_MAX_BYTES
    return dict(
        N=n,
        K=k,
        gs=qw.group_size,
        G=qw.num_groups,
        gsp=gsp,
        bits=qw.bits,
        levels_literal=qw.table.tolist() if small else None,
        has_bias=has_bias,
        epilogue=epilogue,
        n_tables=qw.table.shape[0],
        ln_eps=None if ln_eps is None else repr(float(ln_eps)),
        has_res=has_res,
    )


def render_linear(
    qw: QuantizedWeight,
    family: str,
    has_bias: bool,
    epilogue: str | None,
    act_bits: int | None,
    target_name: str | None = None,
    info: TableInfo | None = None,
    ln_eps: float | None = None,
    has_res: bool = False,
) -> tuple[str, str]:
    """(kernel name, C source) of a linear kernel for a template family ("avx512" or "portable").

    ln_eps: fuse a LayerNorm over the input rows (weight/bias passed as blobs 7 and 8); has_res: add a
    residual tensor (the kernel's `res` argument) to the output."""
    name = kernel_name("linear", target_name or family, qw, act_bits, ln_eps is not None, has_res)
    fusion = dict(ln_eps=ln_eps, has_res=has_res)
    if act_bits not in (8, None):
        raise UnsupportedOp(f"act_bits must be 8 or None, got {act_bits}")
    template = kernel_for(qw.scheme, family if act_bits == 8 else "f32").template
    if act_bits is None or family == "portable":
        ctx = _base_context(qw, qw.group_size, has_bias, epilogue, **fusion)
        return name, render(template, name=name, **ctx)
    knobs = tuning(target_name or family)
    info = info or analyze_tables(qw)
    if info.mode == "codebook" and qw.bits > 4:
        raise UnsupportedOp(
            f"{name}: the avx512 template serves {qw.bits}-bit per-row codebooks only for "
            "bits <= 4; use target='portable' (or attach_kernels(..., fallback=True))"
        )
    n, _ = qw.codes.shape
    ctx = _base_context(qw, padded_group(qw.group_size, 16), has_bias, epilogue, **fusion)
    base = info.base.tolist()
    tidx = qw.table_index
    table_groups = 1 if bool((tidx == tidx[:, :1]).all()) else qw.num_groups
    ctx.update(
        NB=(n + 15) // 16,
        mode=info.mode,
        base=base,
        planes=PLANES[qw.bits],
        table_groups=table_groups,
        mm_mt=knobs["mm_mt"],
        mpad=math.lcm(4, knobs["mm_mt"]),
        prefetch=knobs["prefetch"],
        par_min_macs=knobs["par_min_macs"],
        fast_permb=knobs["fast_permb"] and info.mode != "codebook" and qw.bits in (2, 4),
        identity8=base == list(range(-128, 128)),
    )
    return name, render(template, name=name, **ctx)


def render_conv_grouped(
    name: str,
    qw: QuantizedWeight,
    weight_shape,
    stride,
    padding,
    dilation,
    groups: int,
    has_bias: bool,
    epilogue: str | None,
) -> str:
    """Direct grouped/depthwise conv source (conv1d is rendered as 2-D with a 1-row kernel)."""
    cout, cg = weight_shape[0], weight_shape[1]
    ks = tuple(weight_shape[2:])
    if len(ks) == 1:
        ks, stride, padding, dilation = (1, *ks), (1, *stride), (0, *padding), (1, *dilation)
    ctx = _base_context(qw, qw.group_size, False, epilogue)
    ctx["levels_literal"] = None
    return render(
        "conv_grouped.c.j2",
        name=name,
        cin=cg * groups,
        cout=cout,
        groups=groups,
        kh=ks[0],
        kw=ks[1],
        sh=stride[0],
        sw=stride[1],
        ph=padding[0],
        pw=padding[1],
        dh=dilation[0],
        dw=dilation[1],
        conv_bias=has_bias,
        **ctx,
    )
