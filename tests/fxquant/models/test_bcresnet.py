"""BC-ResNet-2: strict load of the pretrained weights, shapes, export capture, FSDD accuracy."""
import pytest
import torch

from fxquant.datasets import shared_dir
from fxquant.models.bcresnet import (DIGIT_LABEL_INDEX, LABELS, BCResNet, SubSpectralNorm, fsdd_features,
                                     keyword_accuracy, load_bcresnet)


def _weights():
    shared = shared_dir()
    path = None if shared is None else shared / "models" / "bcresnet" / "model-sc-2.pt"
    if path is None or not path.is_file():
        pytest.skip("../shared/models/bcresnet/model-sc-2.pt is not present (set FXQUANT_SHARED)")
    return path


@pytest.fixture(scope="module")
def model():
    return load_bcresnet(_weights())


def test_labels():
    assert len(LABELS) == 35 and LABELS[0] == "backward" and LABELS[-1] == "zero"
    assert [LABELS[i] for i in DIGIT_LABEL_INDEX[:3]] == ["zero", "one", "two"]


def test_subspectral_norm_normalises_each_band():
    ssn = SubSpectralNorm(2, 5).train()
    x = torch.randn(4, 2, 10, 6) * torch.arange(1, 11.0).view(1, 1, 10, 1) + 3.0
    y = ssn(x).view(4, 2, 5, 2, 6)                         # (N, C, band, F/5, T)
    assert y.mean(dim=(0, 3, 4)).abs().max() < 1e-5
    assert torch.allclose(y.var(dim=(0, 3, 4), unbiased=False), torch.ones(2, 5), atol=1e-3)


def test_shapes_random_weights():
    net = BCResNet().eval()
    out = net(torch.randn(3, 1, 40, 32))
    assert out.shape == (3, 35)
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)
    assert net(torch.randn(1, 1, 40, 50)).shape == (1, 35)     # any length >= 5 frames
    assert sum(p.numel() for p in net.parameters()) == 30939


def test_strict_load_and_eval_mode(model):
    assert not model.training
    state = torch.load(_weights(), map_location="cpu", weights_only=True)
    assert set(model.state_dict()) == set(state)
    assert isinstance(model.t1.f1[4], torch.nn.Dropout2d)
    assert torch.equal(model.t1.f2[4].bn.running_mean, state["t1.f2.4.bn.running_mean"])


def test_export_capture_matches_eager(model):
    feats = torch.randn(2, 1, 40, 32)
    exported = torch.export.export(model, (feats,))
    assert torch.allclose(exported.module()(feats), model(feats), atol=1e-5)


def test_accuracy_on_fsdd_test_split(model):
    feats, digits = fsdd_features("test")
    assert feats.shape == (300, 1, 40, 32) and digits.tolist()[:5] == [0] * 5
    correct, total = keyword_accuracy(model, "test")
    assert total == 300
    assert correct >= 255                       # >= 85 %; measured 270/300 (90.0 %)
    assert abs(correct - 270) <= 5


def test_feature_cache_file(tmp_path, monkeypatch):
    _weights()
    from fxquant.models import bcresnet
    feats, digits = fsdd_features("test", cache_path=tmp_path / "f.pt")
    monkeypatch.setattr(bcresnet, "_FEATURE_CACHE", {})
    again, digits2 = fsdd_features("test", cache_path=tmp_path / "f.pt")
    assert torch.equal(again, feats) and torch.equal(digits2, digits)
    monkeypatch.setattr(bcresnet, "_FEATURE_CACHE", {})
    with pytest.raises(ValueError, match="delete it"):
        fsdd_features("train", cache_path=tmp_path / "f.pt")
