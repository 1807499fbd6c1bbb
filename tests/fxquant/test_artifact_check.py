"""The abstract run of a loaded artifact: meta tensors with shape rules, no real allocation, no dynamo import;
and codes loaded as the bit stream they were stored as."""
from __future__ import annotations

import resource
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.fx as fx

import fxquant
from fxquant.artifact_check import abstract_run
from fxquant.artifact_shapes import SHAPE_RULES, broadcast_shapes, shape_rule
from fxquant.errors import ArtifactError
from fxquant.qweight import PackedCodes

aten = torch.ops.aten
F32, I64 = torch.float32, torch.int64


def _t(shape, dtype=F32):
    return torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(0, 5, shape).to(dtype)


POINTWISE = [
    (aten.add.Tensor, (_t((2, 1, 4)), _t((3, 1)))),
    (aten.add.Tensor, (_t((5,), I64), _t((), I64))),
    (aten.add.Tensor, (_t((5,), I64), 2.5)),
    (aten.add.Tensor, (_t((2, 3), torch.float16), _t((2, 3)))),
    (aten.sub.Tensor, (_t((4, 1)), _t((1, 4), I64))),
    (aten.mul.Tensor, (_t((3,), torch.bool), _t((3,), torch.bool))),
    (aten.le.Tensor, (_t((6, 1), I64), _t((1, 7), I64))),
    (aten.eq.Scalar, (_t((3, 2)), 0.0)),
    (aten.where.Scalar, (_t((2, 5)) > 0, 0.0, float("-inf"))),
    (aten.where.self, (_t((2, 1)) > 0, _t((1, 3)), _t((2, 3), I64))),
    (aten.gelu.default, (_t((4, 8)),)),
    (aten.neg.default, (_t((3,), I64),)),
    (aten.abs.default, (_t((2, 2), torch.bfloat16),)),
]
RULES = [
    ("layer_norm.default", (_t((2, 7, 8)), [8], _t((8,)), _t((8,)), 1e-5, True)),
    ("cat.default", ([_t((2, 3)), _t((2, 5))], -1)),
    ("cat.default", ([_t((1, 3)), _t((4, 3))],)),
    ("stack.default", ([_t((2, 3)), _t((2, 3)), _t((2, 3))], 0)),
    ("stack.default", ([_t((2, 3)), _t((2, 3))], -1)),
    ("index_select.default", (_t((5, 4, 3)), 1, torch.tensor([3, 0, 0, 1, 2]))),
    ("index_copy_.default", (_t((2, 8, 3)), 1, torch.tensor([6, 2]), _t((2, 2, 3)))),
    ("clamp.default", (torch.tensor([[3, -1, 9]]), 0, 5)),            # the row-block token lookup's clamp
    ("clamp.default", (_t((2, 3)), -0.5)),
    ("clamp.default", (_t((2, 3)), None, 2)),
]


def _meta(v):
    if isinstance(v, list):
        return [_meta(x) for x in v]
    return v.to("meta") if isinstance(v, torch.Tensor) else v


@pytest.mark.parametrize("op,args", [
    (aten.arange.default, (8,)), (aten.arange.default, (7.5,)), (aten.arange.start, (3, 11)),
    (aten.arange.start_step, (0, 10, 3)), (aten.arange.start_step, (5, -4, -2)),
    (aten.arange.start_step, (0, 1, 0.3)), (aten.arange.start_step, (4, 2, 1)), (aten.arange.start, (2, 2)),
])
def test_arange_rule_matches_torch(op, args):
    meta = {"device": torch.device("meta")}
    try:
        want = op(*args)
    except RuntimeError:
        with pytest.raises(ValueError, match="steps away"):
            shape_rule(op, args, meta)
        return
    got = shape_rule(op, args, meta)
    assert (tuple(got.shape), got.dtype, got.device.type) == (tuple(want.shape), want.dtype, "meta")


@pytest.mark.parametrize("op,args", POINTWISE, ids=lambda v: str(v)[:40])
def test_pointwise_rule_matches_torch(op, args):
    want = op(*args)
    got = shape_rule(op, tuple(_meta(a) for a in args), {})
    assert got is not None and got.device.type == "meta"
    assert (tuple(got.shape), got.dtype) == (tuple(want.shape), want.dtype)


@pytest.mark.parametrize("name,args", RULES, ids=lambda v: str(v)[:40])
def test_shape_rules_match_torch(name, args):
    op = getattr(getattr(aten, name.split(".")[0]), name.split(".")[1])
    want = op(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    got = SHAPE_RULES[name](*[_meta(a) for a in args])
    assert (tuple(got.shape), got.dtype, got.device.type) == (tuple(want.shape), want.dtype, "meta")


@pytest.mark.parametrize("shapes", [((2, 1, 4), (3, 1)), ((), (5,)), ((0, 1), (1, 3)), ((1,), (1, 1, 1)),
                                    ((7, 1, 2), (1, 6, 1), (6, 2)), ((2, 3), (3, 2)), ((4,), (0,)),
                                    ((2, 0), (2, 3))])
def test_broadcast_shapes_is_torchs(shapes):
    try:
        want = tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        with pytest.raises(ValueError, match="do not broadcast"):
            broadcast_shapes(*shapes)
        return
    assert broadcast_shapes(*shapes) == want


def test_rules_leave_unknown_dtypes_to_torch():
    """A float op of an integer tensor, or a promoting cat: no rule answers, the meta function decides."""
    assert shape_rule(aten.sqrt.default, (torch.empty(3, dtype=I64, device="meta"),), {}) is None
    mixed = [torch.empty(2, device="meta"), torch.empty(2, dtype=I64, device="meta")]
    assert SHAPE_RULES["cat.default"](mixed) is None
    assert SHAPE_RULES["clamp.default"](torch.empty(3, dtype=I64, device="meta"), 0.5) is None   # promotes


@pytest.mark.parametrize("name,args", [
    ("cat.default", ([_t((2, 3)), _t((3, 5))], -1)),
    ("stack.default", ([_t((2, 3)), _t((3, 2))], 0)),
    ("layer_norm.default", (_t((2, 7, 8)), [7], None, None, 1e-5, True)),
    ("index_copy_.default", (_t((2, 8, 3)), 1, torch.tensor([6, 2]), _t((2, 3, 3)))),
    ("index_select.default", (_t((5, 4)), 2, torch.tensor([0]))),
])
def test_shape_rules_refuse_what_torch_refuses(name, args):
    op = getattr(getattr(aten, name.split(".")[0]), name.split(".")[1])
    with pytest.raises((RuntimeError, IndexError)):
        op(*args)
    with pytest.raises(ValueError):
        SHAPE_RULES[name](*[_meta(a) for a in args])


def _graph(build) -> fx.GraphModule:
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(build(g, x))
    return fx.GraphModule(torch.nn.Module(), g)


X = [{"name": "x", "kind": "tensor", "dtype": torch.float32, "example": (2, 4)}]


def test_factories_run_on_meta_even_when_the_graph_names_the_cpu():
    """aten.full of 2**29 floats on the CPU would allocate 2 GiB: it is refused by size, never allocated."""
    cpu = {"device": torch.device("cpu")}
    gm = _graph(lambda g, x: g.call_function(aten.full.default, ([1 << 29], 1.0), cpu))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ArtifactError, match="would exceed"):
        abstract_run(gm, X)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 * 1024    # KiB


def test_a_graph_meta_cannot_judge_is_judged_by_the_fake_run():
    """Inconsistent shapes make the meta rule fail; the fake-tensor run then names the node."""
    gm = _graph(lambda g, x: g.call_function(aten.cat.default, ([x, g.call_function(aten.t.default, (x,))],
                                                                1)))
    with pytest.raises(ArtifactError, match="inconsistent at node 'cat_default'"):
        abstract_run(gm, X)
    ok = _graph(lambda g, x: g.call_function(aten.cat.default, ([x, x], 1)))
    assert abstract_run(ok, X)["cat_default"] == [2, 8]


class _Block(torch.nn.Module):
    """LayerNorm, q/k/v linears, attention, a residual add, cat and stack: the ops a Whisper graph holds."""

    def __init__(self, d=32):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))

    def forward(self, x):
        h = self.ln(x)
        q, k, v = (m(h).view(x.shape[0], -1, 2, 16).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        return torch.stack([x + a, torch.cat([a[:, :1], x[:, 1:40]], 1)])


def test_loading_checks_shapes_without_importing_dynamo(tmp_path):
    torch.manual_seed(0)
    cm = fxquant.compile_lowbit(_Block().eval(), (torch.randn(2, 40, 32),), bits=8, target="reference")
    cm.save(tmp_path / "block")
    script = textwrap.dedent(f"""
        import sys, torch, fxquant
        cm = fxquant.load({str(tmp_path / 'block')!r})
        print(cm(torch.randn(1, 40, 32)).shape, "torch._dynamo" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["torch.Size([2,", "1,", "40,", "32])", "False"]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_load_as_the_stored_bit_stream(tmp_path, bits):
    """No unpack and re-pack at load: the op's codes are the weights.bin stream, in a buffer of their own."""
    torch.manual_seed(bits)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8)).eval()
    cm = fxquant.compile_lowbit(model, (torch.randn(3, 40),), bits=bits, target="reference")
    cm.save(tmp_path / "m")
    loaded = fxquant.load(tmp_path / "m")
    ops = [m for m in loaded.graph_module.modules() if isinstance(m, fxquant.ops.LowbitLinear)]
    want = [m for m in cm.graph_module.modules() if isinstance(m, fxquant.ops.LowbitLinear)]
    assert len(ops) == 2
    for op, ref in zip(ops, want):
        packed = op.packed_codes
        assert isinstance(packed, PackedCodes) and packed.layout == "bits"
        n, k = op.code_shape
        assert packed.data.untyped_storage().nbytes() == packed.nbytes == -(-n * k // 8) * bits
        assert torch.equal(op.codes, ref.codes)
    x = torch.randn(3, 40)
    assert torch.equal(loaded(x), cm(x))


def test_codes_stored_at_another_width_than_their_op_are_refused(tmp_path):
    """A manifest that re-labels a 4-bit op's code stream as 2-bit (sizes kept consistent) is refused."""
    import json

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24)).eval()
    fxquant.compile_lowbit(model, (torch.randn(3, 40),), bits=4, target="reference").save(tmp_path / "m")
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    (name, spec), = [(k, v) for k, v in m["tensors"].items() if k.endswith(".codes")]
    spec.update(bits=2, nbytes=spec["nbytes"] // 2)
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="stored as 2-bit codes for a 4-bit op"):
        fxquant.load(tmp_path / "m")
