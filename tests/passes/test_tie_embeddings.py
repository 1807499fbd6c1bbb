from __future__ import annotations

import torch
from torch import nn

import fxquant
from fxquant.ops import LowbitEmbedding, LowbitLinear


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 300, d: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)

    def forward(self, tokens):
        h = torch.relu(self.mix(self.embed(tokens)))
        return torch.matmul(h, self.embed.weight.t())


def test_tied_lookup_shares_the_packed_table(tmp_path):
    model, tokens = TiedLM().eval(), torch.randint(0, 300, (2, 7))
    cm = fxquant.compile_lowbit(model, (tokens,), bits=4, target="reference")
    gm = cm.graph_module
    lookups = [m for m in gm.modules() if isinstance(m, LowbitEmbedding)]
    projections = [m for m in gm.modules() if isinstance(m, LowbitLinear) and m.codes.shape == (300, 64)]
    assert len(lookups) == 1 and len(projections) == 1
    assert lookups[0].codes is projections[0].codes                 # one packed table, two users
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "embed.weight"]
    assert "tie-embeddings" in [t.name for t in cm.timings]
    assert any("1 tied embedding lookups" in t.message for t in cm.timings)
    # the lookup returns exactly the dequantized rows the projection multiplies with
    rows = fxquant.qweight.dequantize(projections[0].qweight)[tokens]
    torch.testing.assert_close(lookups[0](tokens), rows)
    # bytes: fp32 table gone, packed table counted once
    s = cm.summary()
    assert s["model_bytes"] < s["fp32_bytes"] / 5
    # artifacts store the shared table once and restore the sharing
    path = cm.save(tmp_path / "tied")
    assert (path / "weights.bin").stat().st_size < 1.3 * s["model_bytes"]
    loaded = fxquant.load(path)
    assert torch.equal(loaded(tokens), cm(tokens))
    lm = [m for m in loaded.graph_module.modules() if isinstance(m, LowbitEmbedding)][0]
    lp = [
        m for m in loaded.graph_module.modules() if isinstance(m, LowbitLinear) and m.codes.shape == (300, 64)
    ][0]
    assert lm.codes is lp.codes


def test_untied_embedding_stays_float():
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 8)).eval()
    cm = fxquant.compile_lowbit(model, (torch.randint(0, 50, (2, 3)),), bits=8, target="reference")
    emb = [n for n in cm.graph_module.graph.nodes if n.target is torch.ops.aten.embedding.default]
    assert emb and any("left float" in p for p in emb[0].meta["fxq_provenance"])
