"""Format registry: every format packs into QuantizedWeight, exact byte costs, SQNR, bad inputs."""
import pytest
import torch

from fxquant.errors import ConfigError
from fxquant.formats import FORMATS, quantize_weight, sqnr_db, weight_bytes
from fxquant.qweight import dequantize, reference_linear


pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    ("uniform", b, gran, gs, sym)
    for b in (8, 4, 3, 2)
    for gran, gs in (("tensor", None), ("channel", None), ("group", 32), ("group", 64), ("group", 128))
    for sym in (True, False)
    if not (b == 8 and not sym)
]
CASES += [
    ("codebook", b, gran, gs, True)
    for b in (4, 3, 2)
    for gran, gs in (("tensor", None), ("channel", None), ("group", 64))
]


def test_registry_entries():
    assert {"uniform", "codebook", "float"} <= set(FORMATS)


@pytest.mark.parametrize("scheme,bits,gran,gs,sym", CASES)
def test_packs_valid_weight_with_exact_bytes(scheme, bits, gran, gs, sym):
    w = torch.randn(24, 200)  # 200 is not a multiple of 32/64/128: partial last group
    qw = quantize_weight(w, bits, scheme, gran, gs, sym)
    qw.validate()
    assert qw.nbytes() == weight_bytes((24, 200), bits, scheme, gran, gs, sym)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) < 2**bits
    if gran == "group":
        assert qw.scales.shape == (24, -(-200 // gs))
    assert sqnr_db(w, dequantize(qw)) > {8: 35, 4: 15, 3: 9, 2: 3}[bits] - (3 if gran == "tensor" else 0)


def test_w8_per_channel_sqnr_above_35db_on_gaussian():
    w, x = torch.randn(64, 256), torch.randn(32, 256)
    qw = quantize_weight(w, 8, "uniform", "channel")
    assert sqnr_db(w, dequantize(qw)) > 35
    assert sqnr_db(x @ w.T, reference_linear(x, qw)) > 35  # with dynamic int8 activations too


def test_codebook_beats_uniform_on_student_t():
    w = torch.distributions.StudentT(3.0).sample((128, 256))
    cb = sqnr_db(w, dequantize(quantize_weight(w, 4, "codebook", "channel")))
    un = sqnr_db(w, dequantize(quantize_weight(w, 4, "uniform", "channel")))
    assert cb > un + 2.0


def test_table_layouts():
    w = torch.randn(8, 64)
    assert quantize_weight(w, 4, "uniform", "group", 32).table.shape == (1, 16)
    asym = quantize_weight(w, 4, "uniform", "group", 32, symmetric=False)
    assert asym.table.shape == (16, 16) and asym.table[3].tolist() == [i - 3 for i in range(16)]
    cb = quantize_weight(w, 3, "codebook", "group", 32)
    assert cb.table.shape == (16, 8) and cb.table_index.tolist()[1] == [2, 3]


def test_hdiag_weighting_reduces_weighted_error():
    w = torch.randn(32, 64)
    hd = torch.ones(64)
    hd[:8] = 100.0

    def werr(qw):
        return ((dequantize(qw) - w).pow(2) * hd).sum().item()

    assert werr(quantize_weight(w, 2, "codebook", "channel", hdiag=hd)) < werr(
        quantize_weight(w, 2, "codebook", "channel")
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=9), "bits in"),
        (dict(bits=1), "bits in"),
        (dict(bits=8, symmetric=False), "8-bit asymmetric"),
        (dict(bits=4, granularity="group", group_size=0), "group_size must be"),
        (dict(bits=4, granularity="group", group_size=65), "group_size must be"),
        (dict(bits=4, granularity="group", group_size=None), "needs a group_size"),
        (dict(bits=4, granularity="row"), "granularity must be"),
        (dict(bits=4, scheme="lut"), "unknown weight scheme"),
        (dict(bits=4, rounding="gptq"), "needs the input second moments"),
    ],
)
def test_bad_requests_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        quantize_weight(torch.randn(4, 64), where="node 'fc'", **kwargs)


def test_nan_and_empty_weights_name_the_node():
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ConfigError, match="node 'fc'.*NaN"):
        quantize_weight(w, 4, where="node 'fc'")
    with pytest.raises(ConfigError, match="node 'fc'.*zero-size"):
        quantize_weight(torch.zeros(4, 0), 4, where="node 'fc'")


def test_conv_weight_is_flattened_and_zero_rows_are_safe():
    w = torch.randn(6, 3, 3, 3)
    w[2] = 0
    qw = quantize_weight(w, 4, "codebook", "channel")
    assert qw.shape == (6, 27)
    assert dequantize(qw)[2].abs().sum() == 0


def test_quant_cache_returns_the_same_result_once_and_sees_in_place_changes():
    from fxquant.quant_cache import QuantCache

    cache, w, hd = QuantCache(), torch.randn(16, 64), torch.rand(64)
    a = cache.quantize(w, 4, "uniform", "group", 32, hdiag=hd)
    assert cache.quantize(w, 4, "uniform", "group", 32, hdiag=hd) is a and (cache.hits, cache.misses) == (
        1,
        1,
    )
    b = cache.quantize(w, 3, "uniform", "group", 32, hdiag=hd)  # another format: computed
    assert b is not a and cache.misses == 2
    expected = quantize_weight(w, 4, "uniform", "group", 32, hdiag=hd)
    assert torch.equal(a.codes, expected.codes) and torch.equal(a.scales, expected.scales)
    with torch.no_grad():
        w.mul_(2)  # in place: a new version
    assert cache.quantize(w, 4, "uniform", "group", 32, hdiag=hd) is not a
    small = QuantCache(max_bytes=a.codes.numel() + 600)  # room for about one result
    small.quantize(w, 4, "uniform", "group", 32)
    small.quantize(w, 3, "uniform", "group", 32)
    assert len(small._entries) == 1 and small.stored_bytes <= small.max_bytes
