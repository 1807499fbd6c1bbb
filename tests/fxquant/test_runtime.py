"""Runtime quality: thread safety, per-node profile, report contents."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import fxquant


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 128), nn.GELU(), nn.Linear(128, 40)).eval()
    return model, fxquant.compile_lowbit(model, (torch.randn(4, 96),), bits=4)


def test_concurrent_calls_give_the_same_results(compiled):
    _, cm = compiled
    inputs = [torch.randn(1 + i % 5, 96) for i in range(16)]
    expected = [cm(x) for x in inputs]
    results: dict[int, torch.Tensor] = {}
    errors = []

    def worker(offset: int):
        try:
            for i in range(offset, len(inputs), 4):
                for _ in range(5):
                    results[i] = cm(inputs[i])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, y in enumerate(expected):
        assert torch.equal(results[i], y)


def test_profile_splits_forward_time(compiled):
    _, cm = compiled
    text = cm.report(profile=True)
    assert "low-bit kernels" in text and "glue between nodes" in text and "peak RSS" in text
    from fxquant.profiling import profile

    prof = profile(cm.graph_module, (torch.randn(3, 96),), repeat=3)
    kinds = {r["node"]: r["kind"] for r in prof["rows"]}
    assert sorted(k for k, v in kinds.items() if v == "kernel") == sorted(
        r["node"] for r in cm.report_rows())
    assert prof["forward_ms"] > 0 and prof["kernel_ms"] > 0


def test_loaded_module_needs_inputs_to_profile(compiled, tmp_path):
    _, cm = compiled
    loaded = fxquant.load(cm.save(tmp_path / "a"))
    with pytest.raises(TypeError, match="needs inputs"):
        loaded.report(profile=True)
    assert "forward" in loaded.report(profile=True, inputs=(torch.randn(2, 96),))


def test_summary_counts_packed_bytes(compiled):
    model, cm = compiled
    s = cm.summary()
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    assert s["fp32_bytes"] == fp32
    assert s["avg_weight_bits"] == 4.0
    assert s["model_bytes"] < fp32 / 5  # 4-bit codes + per-group scales + fp32 biases


def test_kernel_backed_forward_runs_torch_on_one_thread(compiled):
    """A module whose weights live in C kernels runs torch's glue ops on one thread inside its forward (no
    OpenMP worker to wait on a busy machine); the kernels keep the caller's thread count."""
    from fxquant.codegen import threadpool

    _, cm = compiled
    assert cm.kernels_own_threads()
    seen = []
    inner = cm.graph_module.forward

    def spy(*args):
        seen.append((torch.get_num_threads(), threadpool.num_threads()))
        return inner(*args)

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    cm.graph_module.forward = spy
    try:
        cm(torch.randn(2, 96))
    finally:
        del cm.graph_module.forward
        torch.set_num_threads(old)
    assert seen == [(1, 2)]
    assert torch.get_num_threads() == old


def test_reference_path_module_keeps_torch_threads():
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    cm = fxquant.compile_lowbit(model, (torch.randn(2, 32),), bits=8, target="reference")
    assert not cm.kernels_own_threads()
