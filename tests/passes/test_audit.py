"""audit: the settings of a policy that change nothing for a model are warnings on
``cm.warnings``, issued once, naming the section; what changes something is not."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import mpcompile


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


X = torch.randn(3, 4)


def _warnings(policy: str, **kwargs) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mpcompile.compile(_net(), policy, (X,), **kwargs).warnings


def test_a_level_that_changes_nothing():
    ladder = ("version: 1\ndefault: {input: bf16, weight: bf16}\nlevels:\n  - {name: low}\n"
              "  - {name: same, set: {input: bf16}}\n  - {name: fp32, keep: fp32}\n")
    found = _warnings(ladder)
    assert [w.split(" (")[0] for w in found] == ["level 'same'"]
    assert "changes nothing for this model against level 'low'" in found[0]


def test_keep_fp32_on_ops_fp32_anyway_and_a_rule_later_rules_override():
    policy = ("version: 1\ndefault: {input: bf16}\nrules:\n  - match: {type: ReLU}\n    keep: fp32\n"
              "  - match: {type: Linear}\n    input: fp16\n  - match: {type: Linear}\n    input: e6m9\n")
    assert sorted(_warnings(policy)) == [
        "default: changes nothing for this model: rules set all it sets",
        "rules[0] (<string>:4:5): changes nothing for the ops it matches (1): keep: fp32 on ops that are fp32 anyway",
        "rules[1] (<string>:6:5): changes nothing for the ops it matches (0, 2): later rules set all it sets"]


def test_a_kappa_rule_without_calibration_says_why_it_matches_nothing():
    policy = "version: 1\nrules:\n  - match: {kappa_above: 2}\n    input: bf16\n"
    (text,) = _warnings(policy, calibration=[])
    assert "matches no op of this model; it selects on kappa, which needs calibration batches" in text
    assert not any("kappa" in w for w in _warnings(policy.replace("2}", "1.0001}")))  # calibrated on X


@pytest.mark.parametrize("setting,text", [
    ("{format: fp8_e4m3, sr_bits: 4}", "default: input.sr_bits has no effect: its rounding is nearest"),
    ("{format: fp8_e4m3, axis: 0}", "default: input.axis has no effect: fp8_e4m3 is not a block format"),
])
def test_keys_without_effect_where_they_are_written(setting, text):
    assert text in " ".join(_warnings(f"version: 1\ndefault:\n  input: {setting}\n"))


def test_what_changes_something_warns_nothing_and_warnings_are_issued_once():
    useful = ("version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\nrules:\n  - match: {last: true}\n"
              "    keep: fp32\nlevels:\n  - {name: fp8}\n  - {name: bf16, set: {input: bf16, weight: bf16}}\n")
    assert _warnings(useful) == []
    idle = "version: 1\nrules:\n  - match: {type: Conv2d}\n    input: bf16\n"
    with pytest.warns(UserWarning) as record:
        cm = mpcompile.compile(_net(), idle, (X,))
        cm.eval()(X)  # a second mode, then a recompile: nothing new to say
        cm.recompile(idle)
    assert [str(r.message) for r in record] == ["mpcompile: rules[0] (<string>:3:5): matches no op of this model"]
    assert cm.warnings == ["rules[0] (<string>:3:5): matches no op of this model"]


def test_arithmetic_on_an_op_without_a_gemm_is_a_warning_and_a_scaled_block_format_an_error():
    (text,) = _warnings("version: 1\nrules:\n  - match: {type: ReLU}\n    output: bf16\n    forward: {acc: bf16}\n")
    assert text.startswith("node _1 (ReLU '1'): forward arithmetic not applied: it is for GEMM-like ops")
    with pytest.raises(mpcompile.PolicyError, match=r"<string>:3:11: .*block formats \(mxfp8_e4m3\) carry their own"):
        mpcompile.load_policy("version: 1\ndefault:\n  weight: {format: mxfp8_e4m3, scaling: tensor}\n")
