"""RowBlockEmbedding: the tied token table as row blocks gives the same lookups and logits, and a budget
compile gives every block its own format (no sibling tying, no merging, one packed copy per block)."""
from __future__ import annotations

import pytest
import torch

from fxquant.models.token_blocks import RowBlockEmbedding, split_token_table, whisper_row_blocks
from fxquant.models.whisper import DecoderStep, ModelDimensions, whisper_random

DIMS = ModelDimensions(n_mels=16, n_audio_ctx=8, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                       n_vocab=600, n_text_ctx=16, n_text_state=32, n_text_head=2, n_text_layer=1)
STARTS = [0, 64, 300, 500, 600]


def test_lookup_and_projection_equal_the_single_table():
    emb = torch.nn.Embedding(600, 32)
    blocks = RowBlockEmbedding(emb.weight, STARTS)
    tokens = torch.tensor([[0, 63, 64, 299, 300, 499, 500, 599]])      # both edges of every block
    assert torch.equal(blocks(tokens), emb(tokens))
    assert torch.equal(torch.cat([p.weight for p in blocks.parts]), emb.weight)
    x = torch.randn(3, 2, 32)
    assert torch.allclose(blocks.project(x), x @ emb.weight.t(), atol=1e-5)
    assert [p.weight.shape[0] for p in blocks.parts] == [64, 236, 200, 100]


@pytest.mark.parametrize("starts", [[0, 600], [0, 300, 300, 600], [1, 600], [0, 300], [0, 300, 700], [0]])
def test_bad_block_starts_are_refused(starts):
    if starts == [0, 600]:          # one block is allowed
        assert len(RowBlockEmbedding(torch.zeros(600, 4), starts).parts) == 1
        return
    with pytest.raises(ValueError, match="rise strictly from 0 to 600"):
        RowBlockEmbedding(torch.zeros(600, 4), starts)


def test_whisper_blocks_follow_the_tokenizer_layout():
    assert whisper_row_blocks(51864, 50256, 50363) == [0, 2048, 8192, 16384, 50256, 50363, 51864]
    assert whisper_row_blocks(51865, 50257, 50364) == [0, 2048, 8192, 16384, 50257, 50364, 51865]   # base
    assert whisper_row_blocks(600, 500, 550, text_starts=(64, 300, 900)) == [0, 64, 300, 500, 550, 600]
    with pytest.raises(ValueError, match="eot"):
        whisper_row_blocks(600, 550, 500)


def test_split_model_decodes_the_same_and_leaves_the_original():
    model = whisper_random(DIMS, seed=0).eval()
    before = model.decoder.token_embedding.weight.clone()
    split = split_token_table(model, STARTS)
    assert torch.equal(model.decoder.token_embedding.weight, before)
    assert isinstance(split.decoder.token_embedding, RowBlockEmbedding)
    audio = torch.randn(2, DIMS.n_audio_ctx, DIMS.n_audio_state)
    tokens = torch.tensor([[1, 70], [599, 320]])
    with torch.no_grad():
        a, b = (m.decoder.step(tokens, m.decoder.cross_cache(audio), m.decoder.empty_cache(2), torch.tensor(0))[0]
                for m in (model, split))
    assert torch.allclose(a, b, atol=1e-5) and a.shape == (2, 2, 600)
    own = whisper_random(DIMS, seed=1)
    assert split_token_table(own, STARTS, copy_model=False) is own          # a private copy changes in place
    assert isinstance(own.decoder.token_embedding, RowBlockEmbedding)


def test_a_budget_gives_each_block_its_own_format_and_one_packed_copy():
    from fxquant.asr.joint import PartSpec, compile_jointly
    from fxquant.ops import LowbitEmbedding, LowbitLinear

    torch.manual_seed(0)
    model = split_token_table(whisper_random(DIMS, seed=0).eval(), STARTS)
    dec = model.decoder
    items = [(torch.randint(0, 600, (1, 3)), dec.cross_cache(torch.randn(1, DIMS.n_audio_ctx, DIMS.n_audio_state)),
              dec.empty_cache(1), torch.tensor(0)) for _ in range(2)]
    example = tuple(t.repeat(2, *[1] * (t.dim() - 1)) if t.dim() else t for t in items[0])
    step, = compile_jointly([PartSpec("step", DecoderStep(dec), example, items, lambda out, i: out[0])],
                            avg_bits=3, target="reference", max_batches=1)
    rows = {r["module"]: r for r in step.report_rows()}
    table = [m for m in rows if m.startswith("decoder.token_embedding")]
    assert table == [f"decoder.token_embedding.parts.{i}" for i in range(4)]       # four groups, not merged
    lookups = [m for m in step.graph_module.modules() if isinstance(m, LowbitEmbedding)]
    linears = {m.scales.data_ptr(): m for m in step.graph_module.modules() if isinstance(m, LowbitLinear)}
    assert len(lookups) == 4 and all(m.scales.data_ptr() in linears for m in lookups)   # shared, not copied
    with torch.no_grad():
        ref = DecoderStep(dec)(*[t.clone() for t in items[1]])[0]
        out = step(*[t.clone() for t in items[1]])[0]
    assert out.shape == ref.shape
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9


def test_a_saved_row_block_model_loads_without_importing_dynamo(tmp_path):
    """The lookup's ops (comparisons, clamp, where) all have shape rules: loading stays light (no sympy)."""
    import subprocess
    import sys
    import textwrap

    import fxquant

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = RowBlockEmbedding(torch.randn(300, 32), [0, 100, 300])

        def forward(self, tokens):
            return self.embed.project(self.embed(tokens))

    tokens = torch.randint(0, 300, (2, 5))
    fxquant.compile_lowbit(Tied().eval(), (tokens,), bits=4, target="reference").save(tmp_path / "m")
    script = textwrap.dedent(f"""
        import sys, torch, fxquant
        cm = fxquant.load({str(tmp_path / 'm')!r})
        print(tuple(cm(torch.tensor([[0, 99, 100, 299]])).shape), "torch._dynamo" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(1,", "4,", "300)", "False"]
