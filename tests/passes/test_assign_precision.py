"""assign-precision: bits / default / rules / depthwise default / budget_bytes / option errors."""
import pytest
import torch

from fxquant import ir
from fxquant.errors import ConfigError
from fxquant.formats import weight_bytes
from fxquant.passmanager import PassManager
from fxquant.registry import PassContext
from fxquant.tracing import capture
from fxquant.analysis import PrecisionPlan


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(16, 32, 3, padding=1)
        self.dw = torch.nn.Conv1d(32, 32, 3, padding=1, groups=32)
        self.fc1 = torch.nn.Linear(32, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x):                      # x: (B, 16, T)
        h = self.dw(torch.relu(self.conv(x))).transpose(1, 2)
        return self.fc2(torch.relu(self.fc1(h)))


X = torch.randn(2, 16, 12)


def decide(config, passes="calibrate,sensitivity,assign-precision"):
    gm = capture(Net().eval(), (X,))
    ctx = PassContext(example_inputs=(X,), config=config)
    gm = PassManager(passes).run(gm, ctx)
    return {ir.module_of(n): n.meta[ir.DECISION] for n in gm.graph.nodes if ir.DECISION in n.meta}, ctx


def test_bits_mode_labels_and_provenance():
    d, _ = decide({"bits": 4, "scheme": "auto"})
    assert {m: x.label() for m, x in d.items()} == {
        "conv": "W4 uniform/channel A8",        # K = 48 <= 64: per-channel
        "dw": "W8 uniform/channel A8",          # depthwise default
        "fc1": "W4 uniform/channel A8",         # K = 32
        "fc2": "W4 uniform/g64 A8"}             # K = 128: group 64
    assert d["fc2"].decided_by == "bits=4" and d["dw"].decided_by == "default:depthwise=8"


def test_default_is_w8_per_channel_a8():
    d, ctx = decide({})
    assert all(x.label() == "W8 uniform/channel A8" for x in d.values())
    assert d["fc1"].decided_by == "default:W8" and ctx.analyses.cached(PrecisionPlan).avg_bits == 8.0


def test_rules_override_and_float_and_gptq():
    d, _ = decide({"bits": 3, "gptq": True, "rules": {"fc2": "float", "op:depthwise": 4,
                                                      "re:fc.": {"bits": 2, "scheme": "codebook"}}})
    assert d["fc2"].weight_bits is None and d["fc2"].decided_by == "rule:fc2"
    assert d["fc1"].label() == "W2 codebook/channel A8" and d["fc1"].rounding == "gptq"
    assert d["dw"].weight_bits == 4 and d["conv"].label() == "W3 uniform/channel A8"


def test_budget_bytes_is_met():
    budget = 9000
    gm = capture(Net().eval(), (X,))
    ctx = PassContext(example_inputs=(X,), config={"budget_bytes": budget})
    gm = PassManager("calibrate,sensitivity,assign-precision").run(gm, ctx)
    total = sum(weight_bytes((ir.node_weight(gm, n).shape[0], ir.node_weight(gm, n)[0].numel()),
                             d.weight_bits, d.scheme, d.granularity, d.group_size, d.symmetric)
                for n in gm.graph.nodes if (d := n.meta.get(ir.DECISION)))
    assert total == ctx.analyses.cached(PrecisionPlan).bytes <= budget
    assert total > 0.8 * budget                                    # the budget is used, not wasted


def test_proxy_sensitivity_without_sensitivity_pass():
    d, ctx = decide({"avg_bits": 4.0}, passes="calibrate,assign-precision")
    assert ctx.analyses.cached(PrecisionPlan).avg_bits <= 4.0
    assert {x.decided_by for m, x in d.items() if m != "dw"} == {"budget:avg_bits=4"}


@pytest.mark.parametrize(
    "config,match",
    [
        ({"bits": 4, "avg_bits": 3}, "exclusive"),
        ({"bits": 4, "rules": {"encoder": 4}}, r"rule 'encoder' matches no quantizable node.*conv, dw, fc1"),
        (
            {"bits": 4, "rules": {"fc2": {"bits": 4, "group": 256}}},
            "rule 'fc2'.*group_size must be an integer in 1..128",
        ),
        ({"bits": 4, "group_size": -3}, "group_size must be a positive integer"),
        ({"avg_bits": 4, "scheme": "lut"}, "scheme must be one of"),
    ],
)
def test_bad_options(config, match):
    with pytest.raises(ConfigError, match=match):
        decide(config, passes="assign-precision")


def test_fp32_lstm_weights_count_in_the_budget():
    """LSTM weights have no quantized kernel: they stay fp32, and an average-bits budget must count them."""
    import fxquant
    from fxquant.errors import ConfigError as _ConfigError
    from fxquant.passmanager import PassManager
    from fxquant.registry import PassContext as _Ctx

    class Rnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(16, 32, batch_first=True)
            self.fc = torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.fc(self.rnn(x)[0])

    model, x = Rnn().eval(), torch.randn(2, 5, 16)
    lstm_params = sum(p.numel() for p in model.rnn.parameters() if p.dim() == 2)
    for avg, ok in ((31.5, True), (24.0, False)):
        gm = fxquant.capture(model, (x,))
        ctx = _Ctx(example_inputs=(x,), config={"avg_bits": avg})
        if not ok:
            with pytest.raises(_ConfigError, match="smallest achievable"):
                PassManager("cleanup,propagate-shapes,assign-precision").run(gm, ctx)
            continue
        PassManager("cleanup,propagate-shapes,assign-precision").run(gm, ctx)
        summary = ctx.analyses.cached(PrecisionPlan)
        assert summary.params >= lstm_params + 32 * 8
        assert 30 < summary.avg_bits <= 31.5
