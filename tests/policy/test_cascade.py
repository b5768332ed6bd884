"""The policy cascade (mpcompile/policy/cascade.py): selectors, rules role by role, levels, recompute."""
from __future__ import annotations

import math

import pytest

from mpcompile.errors import PolicyError
from mpcompile.formats import parse
from mpcompile.ops import ArithSpec, Recompute
from mpcompile.policy import NodeFacts, OptimizerSettings, load_policy

from policy_cases import BLOCK, CONV1, DESIGN_EXAMPLE, FC, RELU, roles


def test_design_example_resolves_by_cascade_and_levels():
    p = load_policy(DESIGN_EXAMPLE)
    assert (p.name, [lv.name for lv in p.levels], p.trust_region.eta1) == ("hfp8", ["fp8", "bf16", "fp32"], 0.25)
    assert p.optimizer == OptimizerSettings(master=None, momentum=parse("bf16"), update_rounding="stochastic")
    fc = p.resolve(FC)
    assert roles(fc) == {"input": "fp8_e4m3", "weight": "fp8_e4m3", "grad_output": "fp8_e5m2"}
    assert fc.forward == fc.backward == ArithSpec(acc=parse("e6m9"), order="chunk(32)")
    assert dict(fc.decided_by)["input"] == "default" and fc.matched == ()
    first = p.resolve(CONV1)  # keep: fp32 on the first GEMM
    assert set(roles(first).values()) == {None} and first.forward.is_native and first.backward.is_native
    assert dict(first.decided_by)["weight"].startswith("rules[0] (<string>:12:5)")
    assert roles(p.resolve(RELU)) == {"output": "bf16"}  # only rules quantize non-GEMM ops
    assert roles(p.resolve(FC, "bf16")) == {"input": "bf16", "weight": "bf16", "grad_output": "bf16"}
    assert p.resolve(FC, 1).forward == fc.forward  # the level names no arithmetic
    assert set(roles(p.resolve(CONV1, 1)).values()) == {None}  # levels never lower what a rule kept
    top = p.resolve(FC, 2)
    assert set(roles(top).values()) == {None} and top.forward.is_native
    assert roles(p.resolve(RELU, "fp32")) == {"output": None}


def test_later_rules_override_role_by_role():
    p = load_policy("""
version: 1
default: {input: fp8_e4m3, weight: fp8_e4m3}
rules:
  - match: {type: Linear}
    weight: bf16
    output: fp16
  - match: {name: fc}
    output: null
""")
    a = p.resolve(FC)
    assert roles(a) == {"input": "fp8_e4m3", "weight": "bf16", "output": None}
    assert [label.split(" ")[0] for label in a.matched] == ["rules[0]", "rules[1]"]
    assert dict(a.decided_by)["input"] == "default" and dict(a.decided_by)["output"].startswith("rules[1]")


@pytest.mark.parametrize("match, hits", [
    ("{type: Conv2d}", {"conv1", "layer1.0.conv2"}),
    ("{type: [Linear, activation]}", {"fc", "layer1.0.relu"}),
    ("{type: gemm}", {"conv1", "layer1.0.conv2", "fc"}),
    ("{name: layer1}", {"layer1.0.conv2", "layer1.0.relu"}),
    ("{name: layer1.0.conv}", set()),  # a prefix covers submodules, not names that merely start alike
    ("{name_regex: 'layer\\d+\\.0\\.conv\\d'}", {"layer1.0.conv2"}),
    ("{name_regex: 'conv'}", set()),  # full match
    ("{first: true}", {"conv1"}),
    ("{first: false, type: gemm}", {"layer1.0.conv2", "fc"}),
    ("{last: true}", {"fc"}),
    ("{index: 1}", {"layer1.0.conv2"}),
    ("{index: [-1, 0]}", {"conv1", "fc"}),
    ("{index: 5}", set()),
    ("{kappa_above: 100}", {"fc"}),
    ("{kappa_below: 100, type: gemm}", {"conv1", "layer1.0.conv2"}),
    ("{}", {"conv1", "layer1.0.conv2", "fc", "layer1.0.relu"}),
])
def test_selectors(match, hits):
    p = load_policy(f"version: 1\nrules:\n  - match: {match}\n    output: bf16\n")
    ops = [NodeFacts(**{**vars(op), "kappa": k}) for op, k in ((CONV1, 3.0), (BLOCK, 50.0), (FC, 1e4), (RELU, 2.0))]
    assert {op.name for op in ops if p.resolve(op).matched} == hits


def test_kappa_selectors_skip_ops_without_an_estimate():
    p = load_policy("version: 1\nrules:\n  - match: {kappa_below: 10}\n    keep: fp32\n")
    assert p.resolve(FC).matched == () and len(p.resolve(NodeFacts(**{**vars(FC), "kappa": 2.0})).matched) == 1


def test_levels_by_name_and_number():
    p = load_policy(DESIGN_EXAMPLE)
    assert p.level_index("fp32") == 2 and p.level_index(1) == 1
    with pytest.raises(PolicyError, match="no level named 'fp16'; levels are fp8, bf16, fp32"):
        p.resolve(FC, "fp16")
    with pytest.raises(PolicyError, match="level 3 is out of range: the ladder has 3 levels"):
        p.resolve(FC, 3)


# -- recompute -------------------------------------------------------------------------------------
RECOMPUTE = """\
version: 1
default:
  forward: {acc: e5m2}
  recompute: {tau: 100, forward: {acc: bf16, order: chunk(8)}}
rules:
  - match: {last: true}
    recompute: null
  - match: {index: 1}
    recompute: {tau: inf}
  - match: {type: activation}
    output: bf16
levels:
  - {name: low}
  - {name: tighter, set: {recompute: {tau: 10}}}
  - {name: fp32, keep: fp32}
"""


def test_recompute_resolves_by_cascade_and_levels():
    p = load_policy(RECOMPUTE)
    high = ArithSpec(acc=parse("bf16"), order="chunk(8)")
    conv1 = p.resolve(CONV1)
    assert conv1.recompute == Recompute(100.0, high) and dict(conv1.decided_by)["recompute"] == "default"
    assert p.resolve(BLOCK).recompute == Recompute(math.inf)  # one unit, as forward: the rule's, whole
    fc = p.resolve(FC)
    assert fc.recompute is None and fc.quantizes
    assert dict(fc.decided_by)["recompute"].startswith("rules[0] (<string>:6:5)")
    assert p.resolve(RELU).recompute is None  # default covers GEMM-like ops only
    # a level reaches every op whose forward is emulated, also one a rule turned recompute off for
    assert {op.name: p.resolve(op, "tighter").recompute for op in (CONV1, BLOCK, FC)} == \
        dict.fromkeys(("conv1", "layer1.0.conv2", "fc"), Recompute(10.0))
    top = p.resolve(CONV1, "fp32")  # keep: fp32 turns it off
    assert top.recompute is None and not top.quantizes
    assert load_policy("version: 1\ndefault: {recompute: {tau: 0.5}}\n").default.recompute == Recompute(0.5)
    from_dict = load_policy({"version": 1, "default": {"recompute": {"tau": "inf"}}})
    assert from_dict.default.recompute == Recompute(math.inf)
