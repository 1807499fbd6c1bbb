"""Connected-digit CTC recognizer: committed checkpoint, WER on test strings, export, CTC decoding."""
import pytest
import torch

from fxquant.datasets import shared_dir
from fxquant.models.digits import (BLANK, DEFAULT_CHECKPOINT, VOCAB, DigitsConfig, DigitsCTC, batch_features,
                                   ctc_greedy, features, load_digits_model, transcribe, transcribe_batch)
from fxquant.wer import wer


@pytest.fixture(scope="module")
def model():
    return load_digits_model()


def test_vocab_and_ctc_greedy():
    assert VOCAB[BLANK] == "<blank>" and VOCAB[1:4] == ["zero", "one", "two"] and len(VOCAB) == 11
    ids = [0, 1, 1, 0, 1, 3, 3, 0, 0, 10]
    scores = torch.nn.functional.one_hot(torch.tensor(ids), 11).float()
    assert ctc_greedy(scores) == ["zero", "zero", "two", "nine"]
    assert ctc_greedy(scores, length=5) == ["zero", "zero"]
    assert ctc_greedy(torch.zeros(0, 11)) == []


def test_features_and_shapes():
    f = features(torch.randn(16000))
    assert f.shape == (64, 101)
    assert f.mean(1).abs().max() < 1e-4 and (f.std(1) - 1).abs().max() < 1e-3
    batch, lengths = batch_features([torch.randn(16000), torch.randn(8000)])
    assert batch.shape == (2, 64, 101) and lengths.tolist() == [101, 51]
    net = DigitsCTC(DigitsConfig(channels=32, head_channels=32)).eval()
    assert net(batch).shape == (2, 51, 11)
    assert net.output_lengths(lengths).tolist() == [51, 26]
    with pytest.raises(ValueError, match="1-D"):
        features(torch.zeros(2, 100))


def test_checkpoint_loads(model):
    assert DEFAULT_CHECKPOINT.is_file() and DEFAULT_CHECKPOINT.stat().st_size < 3_000_000
    raw = torch.load(DEFAULT_CHECKPOINT, map_location="cpu", weights_only=True)
    assert set(raw) == {"config", "state_dict", "meta"}
    assert all(v.dtype in (torch.float32, torch.int64) for v in raw["state_dict"].values())
    n = sum(p.numel() for p in model.parameters())
    assert n == raw["meta"]["params"] and 300_000 < n < 3_000_000
    assert not model.training
    with pytest.raises(FileNotFoundError, match="train_digits"):
        load_digits_model("/nonexistent/digits.pt")


def test_export_matches_eager(model):
    feats = features(torch.randn(24000) * 0.1)[None]
    exported = torch.export.export(model, (feats,))
    assert torch.allclose(exported.module()(feats), model(feats), atol=1e-5)
    frames = torch.export.Dim("frames", min=16, max=4000)
    dynamic = torch.export.export(model, (feats,), dynamic_shapes={"feats": {2: frames}}).module()
    other = features(torch.randn(11000) * 0.1)[None]
    assert torch.allclose(dynamic(other), model(other), atol=1e-5)


def test_wer_on_test_strings(model):
    shared = shared_dir()
    if shared is None or not (shared / "data" / "fsdd").is_dir():
        pytest.skip("../shared/data/fsdd is not present beside the repository (set FXQUANT_SHARED)")
    from fxquant.datasets import digit_test_set
    test = digit_test_set(30, seed=0)
    hyps = [transcribe(model, w) for w, _ in test]
    score = wer([r for _, r in test], hyps)
    assert score <= 0.10
    assert transcribe_batch(model, [w for w, _ in test[:8]], batch_size=1) == hyps[:8]
