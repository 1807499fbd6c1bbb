from __future__ import annotations

import torch
from torch import nn

import fxquant
from fxquant.ops import LowbitLinear
from fxquant.qweight import QuantizedWeight, concat_rows, dequantize

SLICE = torch.ops.aten.slice.Tensor


class QKV(nn.Module):
    def __init__(self, d: int = 64):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, 32, bias=False), nn.Linear(d, d)
        self.other = nn.Linear(16, 8)

    def forward(self, x, y):
        q, k, v = self.query(x), self.key(x), self.value(x)
        return q * v.sigmoid(), k * 2, self.other(y)


def _pipeline(merge: bool) -> str:
    return "cleanup,propagate-shapes,calibrate,assign-precision,quantize,lower" + (
        ",merge-siblings" if merge else ""
    )


def test_siblings_become_one_call_with_identical_outputs():
    model, x, y = QKV().eval(), torch.randn(3, 5, 64), torch.randn(2, 16)
    cm = fxquant.compile_lowbit(model, (x, y), bits=4, passes=_pipeline(True), target="reference")
    ref = fxquant.compile_lowbit(model, (x, y), bits=4, passes=_pipeline(False), target="reference")
    gm = cm.graph_module
    lin = [m for m in gm.modules() if type(m) is LowbitLinear]
    assert sorted(m.codes.shape[0] for m in lin) == [8, 160]  # q+k+v merged, `other` alone
    slices = [n for n in gm.graph.nodes if n.target is SLICE]
    assert [n.args[2:] for n in slices] == [(0, 64), (64, 96), (96, 160)]
    merged = next(
        n for n in gm.graph.nodes if n.op == "call_module" and "query+key+value" in n.meta["fxq_module"]
    )
    assert merged.meta["fxq_module"] == "query+key+value"
    assert merged.meta["fxq_quant_stats"]["fp32_bytes"] == 4 * (64 * 64 + 64 * 32 + 64 * 64)
    for a, b in zip(cm(x, y), ref(x, y)):
        assert torch.equal(a, b)
    # bytes: key's zero bias (32 floats) added, two of the three shared 16-entry level tables dropped
    assert cm.summary()["model_bytes"] == ref.summary()["model_bytes"] + 4 * 32 - 2 * 16
    assert any("3 linears merged into 1 calls" in t.message for t in cm.timings)


def test_merged_kernel_matches_separate_kernels(tmp_path):
    # kernels on both sides: never_slower would time each against torch and may keep the fp32 op on one side
    model, x, y = QKV().eval(), torch.randn(1, 1, 64), torch.randn(1, 16)
    codegen = ",codegen{never_slower=false}"
    cm = fxquant.compile_lowbit(model, (x, y), bits=4, passes=_pipeline(True) + codegen)
    ref = fxquant.compile_lowbit(model, (x, y), bits=4, passes=_pipeline(False) + codegen)
    for c in (cm, ref):
        assert all(r["backend"].startswith("c:") for r in c.report_rows() if "backend" in r), c.report_rows()
    for a, b in zip(cm(x, y), ref(x, y)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    loaded = fxquant.load(cm.save(tmp_path / "m"))
    for a, b in zip(loaded(x, y), cm(x, y)):
        assert torch.equal(a, b)


class QKVRelu(QKV):
    def forward(self, x, y):
        return self.query(x) * self.value(x).sigmoid(), self.key(x).relu(), self.other(y)


def test_ops_with_another_epilogue_are_not_merged():
    model, x, y = QKVRelu().eval(), torch.randn(3, 5, 64), torch.randn(2, 16)
    cm = fxquant.compile_lowbit(model, (x, y), bits=4, passes=_pipeline(True), target="reference")
    widths = sorted(m.codes.shape[0] for m in cm.graph_module.modules() if type(m) is LowbitLinear)
    assert widths == [8, 32, 128]  # query+value merged, key (fused relu) alone


def test_concat_rows_keeps_every_row_and_table():
    a = QuantizedWeight.uniform_symmetric(torch.randn(5, 40), 4, 16)
    b = QuantizedWeight.uniform_symmetric(torch.randn(3, 40), 4, 16)
    b.table = b.table.clone()
    b.table[0, 0] = -7  # a different table: stacked, indices shifted
    m = concat_rows([a, b])
    assert m.table.shape[0] == 2 and int(m.table_index[5:].min()) == 1
    torch.testing.assert_close(dequantize(m), torch.cat([dequantize(a), dequantize(b)]))
    shared = concat_rows([a, QuantizedWeight.uniform_symmetric(torch.randn(2, 40), 4, 16)])
    assert shared.table.shape[0] == 1


def test_long_merged_names_are_shortened():
    """Eight projections of one input (Whisper's cross-attention K/V of four layers) get a short name that
    artifacts accept."""
    import fxquant as fxq

    class Many(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.ModuleDict(
                    {
                        "cross_attention_key_projection": torch.nn.Linear(16, 16),
                        "cross_attention_value_projection": torch.nn.Linear(16, 16),
                    }
                )
                for _ in range(4)
            )

        def forward(self, x):
            return [
                m[k](x)
                for m in self.layers
                for k in ("cross_attention_key_projection", "cross_attention_value_projection")
            ]

    cm = fxq.compile_lowbit(Many().eval(), (torch.randn(2, 16),), bits=8, target="reference")
    names = [n for n, _ in cm.graph_module.named_children() if "more" in n]
    assert names and all(len(n) <= 200 for n in names)


class BlockTiedLM(nn.Module):
    """A tied table held as row blocks (fxquant.models.token_blocks): each block is a lookup and a linear."""

    def __init__(self):
        super().__init__()
        from fxquant.models.token_blocks import RowBlockEmbedding

        self.embed = RowBlockEmbedding(torch.randn(300, 64), [0, 100, 300])
        self.mix = nn.Linear(64, 64)

    def forward(self, tokens):
        return self.embed.project(torch.relu(self.mix(self.embed(tokens))))


def test_row_blocks_of_a_tied_table_are_not_merged(tmp_path):
    from fxquant.ops import LowbitEmbedding

    model, tokens = BlockTiedLM().eval(), torch.randint(0, 300, (2, 7))
    cm = fxquant.compile_lowbit(model, (tokens,), bits=4, target="reference")   # one format: mergeable
    gm = cm.graph_module
    table = sorted(m.codes.shape[0] for m in gm.modules()
                   if type(m) is LowbitLinear and m.codes.shape[1] == 64 and m.codes.shape[0] != 64)
    assert table == [100, 200]                    # still two calls, each sharing its codes with its lookup
    lookups = [m for m in gm.modules() if isinstance(m, LowbitEmbedding)]
    linears = {m.scales.data_ptr() for m in gm.modules() if type(m) is LowbitLinear}
    assert len(lookups) == 2 and all(m.scales.data_ptr() in linears for m in lookups)
    loaded = fxquant.load(cm.save(tmp_path / "blocks"))
    assert torch.equal(loaded(tokens), cm(tokens))
