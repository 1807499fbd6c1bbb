"""Rules: pattern kinds, precedence table, decisions, errors."""
import pytest

from fxquant.errors import ConfigError
from fxquant.rules import assign, make_decision, parse_rules, pick


pytestmark = pytest.mark.usefixtures("one_thread")

NODES = [("linear", "encoder.blocks.0.attn.q", "linear"), ("linear_1", "encoder.blocks.0.mlp.0", "linear"),
         ("conv2d", "encoder.conv1", "conv2d"), ("conv2d_1", "encoder.dw", "depthwise"),
         ("linear_2", "decoder.head", "linear")]


@pytest.mark.parametrize(
    "rules,module,op,winner",
    [
        # exact > regex > glob > op
        (
            {"op:linear": 4, "encoder.*": 3, r"re:encoder\.blocks\..*": 2, "encoder.blocks.0.mlp.0": 8},
            "encoder.blocks.0.mlp.0",
            "linear",
            "encoder.blocks.0.mlp.0",
        ),
        (
            {"op:linear": 4, "encoder.*": 3, r"re:encoder\.blocks\..*": 2},
            "encoder.blocks.0.mlp.0",
            "linear",
            r"re:encoder\.blocks\..*",
        ),
        (
            {r"re:encoder\.blocks\..*": 2, "encoder.*": 3},
            "encoder.blocks.0.mlp.0",
            "linear",
            r"re:encoder\.blocks\..*",
        ),
        ({"op:linear": 4, "encoder.*": 3}, "encoder.blocks.0.mlp.0", "linear", "encoder.*"),
        ({"op:linear": 4, "encoder.*": 3}, "decoder.head", "linear", "op:linear"),
        # same kind: the later rule wins
        ({"encoder.*": 3, "*.mlp.*": 2}, "encoder.blocks.0.mlp.0", "linear", "*.mlp.*"),
        ({"*.mlp.*": 2, "encoder.*": 3}, "encoder.blocks.0.mlp.0", "linear", "encoder.*"),
        # op:conv covers conv1d/conv2d/depthwise
        ({"op:conv": 8, "op:depthwise": "float"}, "encoder.dw", "depthwise", "op:depthwise"),
        ({"op:conv": 8}, "encoder.dw", "depthwise", "op:conv"),
    ],
)
def test_precedence_table(rules, module, op, winner):
    assert pick(parse_rules(rules), module, op).pattern == winner


def test_assign_maps_nodes_to_rules():
    out = assign(parse_rules({"op:linear": 4, "encoder.conv1": "float"}), NODES)
    assert {k: v.pattern for k, v in out.items()} == {
        "linear": "op:linear",
        "linear_1": "op:linear",
        "linear_2": "op:linear",
        "conv2d": "encoder.conv1",
    }


def test_make_decision_defaults_and_fields():
    d = make_decision({"bits": 4}, {}, 384, "rule:x", "rule 'x'")
    assert (d.weight_bits, d.scheme, d.granularity, d.group_size, d.act_bits) == (
        4,
        "uniform",
        "group",
        64,
        8,
    )
    assert make_decision({"bits": 4}, {}, 32, "r", "w").granularity == "channel"  # K <= group: per-channel
    assert make_decision({"bits": 8}, {}, 384, "r", "w").granularity == "channel"
    d = make_decision({"bits": 3, "scheme": "codebook", "group": 128, "rounding": "gptq"}, {}, 384, "r", "w")
    assert (d.scheme, d.granularity, d.group_size, d.rounding) == ("codebook", "group", 128, "gptq")
    d = make_decision({"float": True}, {"bits": 4}, 384, "rule:head", "w")
    assert d.weight_bits is None and d.label() == "float"
    assert (
        make_decision({}, {"bits": 2, "gptq": True, "group_size": 32}, 384, "bits=2", "w").label()
        == "W2 uniform/g32 A8"
    )


@pytest.mark.parametrize(
    "rules,match",
    [
        ({"encoder.conv1": 1}, r"bits must be one of \(8, 4, 3, 2\)"),
        ({"encoder.conv1": 9}, r"bits must be one of \(8, 4, 3, 2\)"),
        ({"encoder.conv1": 5}, r"bits must be one of \(8, 4, 3, 2\)"),
        ({"encoder.conv1": {"bits": 4, "group": 0}}, "group must be a positive integer"),
        ({"encoder.conv1": {"bits": 8, "symmetric": False}}, "8-bit asymmetric"),
        ({"encoder.conv1": {"bits": 4, "colour": "red"}}, r"unknown key\(s\) \['colour'\]"),
        ({"encoder.conv1": {"bits": 4, "scheme": "lut"}}, "scheme must be one of"),
        ({"encoder.conv1": {"bits": 4, "act_bits": 4}}, "act_bits must be 8 or None"),
        ({"re:encoder[": 4}, "invalid regular expression"),
        ({"op:matmul": 4}, "unknown op type"),
        ({"encoder.conv1": {"float": True, "bits": 4}}, "keeps the weight fp32"),
        ({"encoder.conv1": {"min_bits": 7}}, "min_bits must be one of 2, 3, 4, 5, 6, 8"),
        ({"encoder.conv1": {"min_bits": True}}, "min_bits must be one of"),
        ({"encoder.conv1": {"bits": 4, "min_bits": 3}}, "pins the width, so min_bits=3 has no effect"),
    ],
)
def test_bad_rules_name_the_rule(rules, match):
    with pytest.raises(ConfigError, match=match):
        parse_rules(rules)


def test_contradictory_and_unmatched_rules():
    with pytest.raises(ConfigError, match="given twice with different values"):
        parse_rules([("encoder.*", 4), ("encoder.*", 3)])
    assert len(parse_rules([("encoder.*", 4), ("encoder.*", 4)])) == 1
    with pytest.raises(
        ConfigError, match=r"rule 'encoder\.conv2' matches no quantizable node.*encoder\.conv1"
    ):
        assign(parse_rules({"encoder.conv2": 4}), NODES)
    with pytest.raises(ConfigError, match="rule 'op:conv1d' matches no.*op:conv2d"):
        assign(parse_rules({"op:conv1d": 4}), NODES)


def test_explicit_group_larger_than_k_is_an_error():
    with pytest.raises(ConfigError, match="rule 'x'.*group_size must be an integer in 1..32"):
        make_decision({"bits": 4, "group": 64}, {}, 32, "rule:x", "rule 'x'")


def test_global_codebook_scheme_applies_to_low_bits_only():
    assert make_decision({}, {"bits": 8, "scheme": "codebook"}, 64, "bits=8", "w").scheme == "uniform"
    assert make_decision({}, {"bits": 4, "scheme": "codebook"}, 64, "bits=4", "w").scheme == "codebook"
    assert make_decision({"bits": 8, "scheme": "codebook"}, {}, 64, "rule:x", "w").scheme == "codebook"
