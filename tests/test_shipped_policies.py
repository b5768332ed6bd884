"""The precision policies shipped in mpcompile/policies/*.yaml (policies/ links there): each loads, cites its source in a comment
header, and resolves to the formats its header promises."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mpcompile
from mpcompile.formats import BlockMinifloat, FixedFormat, FloatFormat, MXFormat, parse
from mpcompile.ops import ArithSpec
from mpcompile.ops.roles import quantize_role
from mpcompile.ops.spec import ROLES, QuantSpec
from mpcompile.policy import NodeFacts

POLICIES = mpcompile.policy.SHIPPED_POLICIES
SHIPPED = {"fp32", "bf16", "fp16", "fp8_e4m3", "hfp8", "fp134", "bm8", "swalp8", "mxfp8", "mxfp6", "mxfp4",
           "keep_ends", "trust_region", "halp8", "lpsvrg8"}

# A model with four GEMM-like ops and one activation, in execution order.
FIRST = NodeFacts("Conv2d", "conv1", "gemm", 0, 4)
MIDDLE = NodeFacts("Conv2d", "layer1.0.conv2", "gemm", 1, 4)
LINEAR = NodeFacts("Linear", "layer2.fc", "gemm", 2, 4)
LAST = NodeFacts("Linear", "fc", "gemm", 3, 4)
RELU = NodeFacts("ReLU", "layer1.0.relu", "activation")


def load(name: str):
    return mpcompile.load_policy(POLICIES / f"{name}.yaml")


def roles(assignment) -> dict[str, str | None]:
    return {r: None if s.quant is None else str(s.quant) for r, s in assignment.roles}


def quants(assignment) -> dict[str, QuantSpec | None]:
    return {r: s.quant for r, s in assignment.roles}


def kept_fp32(assignment) -> bool:
    """Every role left untouched and torch's own arithmetic: what `keep: fp32` resolves to."""
    return (dict(assignment.roles).keys() == set(ROLES) and all(s.quant is None for _, s in assignment.roles)
            and assignment.forward.is_native and assignment.backward.is_native)


# -- every file ----------------------------------------------------------------------------------
def test_the_shipped_set():
    assert {p.stem for p in POLICIES.glob("*.yaml")} == SHIPPED == set(mpcompile.policy.shipped_policies())


def test_a_shipped_policy_loads_by_its_bare_name():
    assert mpcompile.load_policy("hfp8") == load("hfp8")
    with pytest.raises(mpcompile.PolicyError, match=r"'hfp9' is neither a policy file nor a shipped policy.*'hfp8'"):
        mpcompile.load_policy("hfp9")


def test_the_repository_policies_folder_is_the_shipped_one():
    assert (Path(__file__).resolve().parent.parent / "policies").resolve() == POLICIES


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_loads_and_cites_its_source(name):
    path = POLICIES / f"{name}.yaml"
    policy = mpcompile.load_policy(path)
    assert policy.name == name and policy.source == str(path) and policy.description
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 5, f"{name}: the file must open with a comment header"
    text = "\n".join(header)
    source = re.search(r"^# Source: (.*)$", text, re.M)
    assert source, f"{name}: the header has no 'Source:' line"
    assert re.search(r"\b(19|20)\d\d\b", text[source.start():]), f"{name}: the source names no year"
    assert "lacks" in text or "nothing" in text, f"{name}: the header must say what mpcompile lacks"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_non_gemm_ops_are_left_alone(name):
    a = load(name).resolve(RELU)
    assert a.roles == () and a.forward.is_native and a.backward.is_native


@pytest.mark.parametrize("name", sorted(n for n in SHIPPED if load(n).levels))
def test_every_ladder_ends_at_fp32(name):
    policy = load(name)
    top = policy.levels[-1].name
    assert top == "fp32" and policy.levels[0].name != "fp32"
    for op in (FIRST, MIDDLE, LINEAR, LAST):
        a = policy.resolve(op, top)
        assert all(s.quant is None for _, s in a.roles) and a.forward.is_native and a.backward.is_native
    assert any(s.quant is not None for _, s in policy.resolve(MIDDLE).roles)  # level 0 does quantize


# -- fp32, keep_ends -----------------------------------------------------------------------------
def test_fp32_changes_nothing():
    p = load("fp32")
    assert p.levels == () and p.rules == ()
    for op in (FIRST, MIDDLE, LAST):
        a = p.resolve(op)
        assert a.roles == () and a.forward.is_native and a.backward.is_native and a.matched == ()


def test_keep_ends_keeps_only_the_ends():
    p = load("keep_ends")
    assert p.default.roles == () and p.default.forward is None and p.default.backward is None
    assert kept_fp32(p.resolve(FIRST)) and kept_fp32(p.resolve(LAST))
    for op in (MIDDLE, LINEAR):
        a = p.resolve(op)
        assert a.roles == () and a.matched == ()


# -- 16-bit --------------------------------------------------------------------------------------
def test_fp16_rounds_operands_and_results_and_accumulates_in_fp32():
    a = load("fp16").resolve(MIDDLE)
    assert roles(a) == {r: "fp16" for r in ("input", "weight", "bias", "output", "grad_output", "grad_input",
                                             "grad_weight")}
    assert a.forward == a.backward == ArithSpec(acc="fp32") and a.forward.is_native


def test_bf16_rounds_operands_only():
    a = load("bf16").resolve(LINEAR)
    assert roles(a) == {"input": "bf16", "weight": "bf16", "grad_output": "bf16"}
    assert quants(a)["weight"].fmt == FloatFormat(8, 7) and a.forward.is_native


# -- 8-bit floats ------------------------------------------------------------------------------------
def test_hfp8_hybrid_formats_chunked_accumulation_and_fp32_ends():
    p = load("hfp8")
    mid = p.resolve(MIDDLE)
    q = quants(mid)
    assert set(q) == {"input", "weight", "grad_output"}
    fwd = q["input"].fmt  # FP8 1-4-3 with the paper's exponent bias 11, all codes finite
    assert isinstance(fwd, FloatFormat) and (fwd.exp, fwd.man, fwd.bias) == (4, 3, 11)
    assert fwd.max == 30.0 and fwd.min_normal == 2.0**-10
    assert fwd != parse("fp8_e4m3")  # OCP E4M3 has bias 7
    assert q["weight"].fmt == fwd and q["input"].rounding == "nearest" and q["input"].scaling == "none"
    assert q["input"].saturate and q["weight"].saturate  # no code for an overflow: it clamps to 30
    assert quantize_role(torch.tensor([31.0, -1e4]), q["input"], axis=0, seed=None).tolist() == [30.0, -30.0]
    assert q["grad_output"].fmt == parse("fp8_e5m2") and str(q["grad_output"]) == "fp8_e5m2"
    assert mid.forward == mid.backward == ArithSpec(acc="e6m9", order="chunk(64)")
    assert mid.forward.acc == FloatFormat(6, 9) and mid.forward.chunk == 64
    assert roles(p.resolve(LINEAR)) == roles(mid)
    for end in (FIRST, LAST):
        a = p.resolve(end)
        assert kept_fp32(a) and len(a.matched) == 1
    sixteen = p.resolve(MIDDLE, "fp16")
    assert roles(sixteen) == {"input": "fp16", "weight": "fp16", "grad_output": "fp16"}
    assert sixteen.forward.is_native and sixteen.backward.is_native
    assert kept_fp32(p.resolve(FIRST, "fp16"))  # the ladder never lowers a layer kept in fp32


def test_fp8_e4m3_uses_e4m3_with_per_tensor_amax_scaling_for_every_operand():
    p = load("fp8_e4m3")
    a = p.resolve(LAST)
    assert roles(a) == {r: "fp8_e4m3:tensor_amax" for r in ("input", "weight", "grad_output")}
    assert quants(a)["grad_output"].fmt.max == 448.0 and a.forward.is_native
    assert [lv.name for lv in p.levels] == ["fp8", "bf16", "fp32"]
    assert roles(p.resolve(LAST, "bf16")) == {"input": "bf16", "weight": "bf16", "grad_output": "bf16"}


def test_fp134_is_1_3_4_with_a_power_of_two_bias_per_tensor():
    q = quants(load("fp134").resolve(MIDDLE))
    assert set(q) == {"input", "weight", "grad_output"}
    for spec in q.values():
        assert spec.fmt == FloatFormat(3, 4, inf=False, nan="none") and spec.fmt.bits == 8
        assert spec.scaling == "tensor" and spec.rounding == "nearest"


# -- block formats ---------------------------------------------------------------------------------
def test_bm8_block_minifloats_with_stochastic_rounding():
    q = quants(load("bm8").resolve(LINEAR))
    assert q["input"].fmt == q["weight"].fmt == BlockMinifloat(2, 5, 48)
    assert q["grad_output"].fmt == BlockMinifloat(4, 3, 48)
    assert q["grad_output"].fmt.element == FloatFormat(4, 3, inf=False, nan="none")
    assert {s.rounding for s in q.values()} == {"stochastic"} and set(q) == {"input", "weight", "grad_output"}


def test_swalp8_is_8_bit_bfp_per_tensor_and_per_output_channel():
    q = quants(load("swalp8").resolve(MIDDLE))
    assert set(q) == {"input", "weight", "bias", "grad_output", "grad_weight", "grad_bias"}
    assert {s.fmt for s in q.values()} == {FixedFormat(8, 6)} == {parse("bfp(8,32)").element}
    assert {s.rounding for s in q.values()} == {"stochastic"} and all(s.saturate for s in q.values())
    assert {r: s.scaling for r, s in q.items()} == {"input": "tensor", "weight": "channel", "bias": "tensor",
                                                    "grad_output": "tensor", "grad_weight": "channel",
                                                    "grad_bias": "tensor"}


def test_swalp8_channel_scaling_is_bfp_with_one_block_per_output_channel():
    """The header's claim: fixed(8,6) under power-of-two channel scaling rounds exactly like
    bfp(8, K) with one block per row of a [out, K] weight (rows whose amax is not within the
    top 1/128 of its binade, where SWALP clips and the scaling drops one bit instead)."""
    torch.manual_seed(0)
    w = torch.randn(16, 40, dtype=torch.float64)
    peak = torch.ldexp(torch.full((16,), 1.5, dtype=torch.float64), torch.arange(-8, 8))
    w = w / w.abs().amax(dim=1, keepdim=True) * peak[:, None]  # row amax = 1.5 * 2**k
    spec = QuantSpec("fixed(8,6)", "nearest", "channel", saturate=True)
    got = quantize_role(w, spec, axis=0, seed=None)
    want = mpcompile.quantize(w, "bfp(8,40)")
    assert torch.equal(got, want) and not torch.equal(got, w)


@pytest.mark.parametrize("name, forward, grad", [
    ("mxfp8", "mxfp8_e4m3", "mxfp8_e5m2"),
    ("mxfp6", "mxfp6_e2m3", "mxfp6_e3m2"),
    ("mxfp4", "mxfp4_e2m1", "mxfp4_e2m1"),
])
def test_mx_policies_use_the_ocp_formats_with_block_32(name, forward, grad):
    q = quants(load(name).resolve(LINEAR))
    assert set(q) == {"input", "weight", "grad_output"}
    assert q["input"].fmt == q["weight"].fmt == parse(forward) and q["grad_output"].fmt == parse(grad)
    for spec in q.values():
        assert isinstance(spec.fmt, MXFormat) and spec.fmt.block_size == 32 and spec.fmt.axis == -1
        assert spec.rounding == "nearest" and spec.scaling == "none"


def test_mxfp4_weight_is_fp4_e2m1_and_its_ladder_climbs_through_mxfp6_and_mxfp8():
    p = load("mxfp4")
    weight = quants(p.resolve(MIDDLE))["weight"].fmt
    assert weight == MXFormat(parse("fp4_e2m1"), 32) and str(weight) == "mxfp4_e2m1" and weight.element.max == 6.0
    assert [lv.name for lv in p.levels] == ["mxfp4", "mxfp6", "mxfp8", "bf16", "fp32"]
    assert roles(p.resolve(MIDDLE, "mxfp6")) == {"input": "mxfp6_e2m3", "weight": "mxfp6_e2m3",
                                                 "grad_output": "mxfp6_e3m2"}
    assert roles(p.resolve(MIDDLE, "mxfp8")) == {"input": "mxfp8_e4m3", "weight": "mxfp8_e4m3",
                                                 "grad_output": "mxfp8_e5m2"}


def test_trust_region_climbs_from_fp8_e4m3_to_bf16_to_fp32_with_the_seed_settings():
    policy = load("trust_region")
    assert [lv.name for lv in policy.levels] == ["fp8", "bf16", "fp32"]
    assert roles(policy.resolve(MIDDLE, 0)) == roles(load("fp8_e4m3").resolve(MIDDLE, 0))
    assert roles(policy.resolve(MIDDLE, 1)) == {"input": "bf16", "weight": "bf16", "grad_output": "bf16"}
    top = policy.resolve(MIDDLE, 2)
    assert not top.quantizes and top.unit_roundoff == 0  # a level's keep sets what was quantized
    tr = policy.trust_region
    assert (tr.method, tr.eta1, tr.eta2, tr.delta0, tr.epsilon) == ("trust_region", 0.25, 0.75, 0.1, "measured")
