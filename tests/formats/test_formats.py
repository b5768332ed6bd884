"""Number-format descriptions: limits and value sets against ml_dtypes and gfloat, the spec
language (``parse(str(f)) == f``), hashing/immutability, and error messages.

Oracles: ``ml_dtypes.finfo`` and bit-pattern decoding through ml_dtypes for the types it
has; ``gfloat.formats.format_info_p3109`` / ``format_info_ocp_*`` and ``gfloat.decode_ndarray``
for P3109 and the OCP MX element types.
"""
from __future__ import annotations

import dataclasses
import math

import gfloat
import gfloat.formats as gf
import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mpcompile
from mpcompile.formats import (BlockFloat, BlockMinifloat, FixedFormat, FloatFormat, MXFormat, get, names, p3109,
                               parse)

ML = {  # format -> the ml_dtypes / numpy type with the same value set and specials
    "fp64": np.float64, "fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16,
    "fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "fp8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "fp8_e3m4": ml_dtypes.float8_e3m4, "fp6_e3m2": ml_dtypes.float6_e3m2fn, "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn, "e8m0": ml_dtypes.float8_e8m0fnu,
    "e4m3": ml_dtypes.float8_e4m3, "e4m3(bias=11,inf=false,nan=negzero)": ml_dtypes.float8_e4m3b11fnuz,
}
SMALL_ML = {k: t for k, t in ML.items() if parse(k).bits <= 16}
P3109 = [(k, p, s, d) for k in (3, 4, 5, 6, 8) for s in (True, False) for p in range(1, k if s else k + 1)
         for d in ("extended", "finite")] + [(16, 8, True, "extended"), (16, 11, False, "finite")]
OCP = {"fp8_e4m3": gf.format_info_ocp_e4m3, "fp8_e5m2": gf.format_info_ocp_e5m2, "fp6_e3m2": gf.format_info_ocp_e3m2,
       "fp6_e2m3": gf.format_info_ocp_e2m3, "fp4_e2m1": gf.format_info_ocp_e2m1, "e8m0": gf.format_info_ocp_e8m0}


def p3109_id(case):
    k, p, s, d = case
    return f"k{k}p{p}{'s' if s else 'u'}{d[0]}"


def gf_p3109(k, p, signed, domain):
    return gf.format_info_p3109(k, p, gfloat.Signedness.Signed if signed else gfloat.Signedness.Unsigned,
                                gfloat.Domain.Extended if domain == "extended" else gfloat.Domain.Finite)


def finite_sorted(v: np.ndarray) -> np.ndarray:
    """Finite values ascending, -0 before +0 (the order of ``values()``)."""
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return v[np.lexsort((~np.signbit(v), v))]


def assert_same_values(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (len(got), len(want))
    assert np.array_equal(got, want) and np.array_equal(np.signbit(got), np.signbit(want))


# -- limits and value sets -------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ML)
def test_limits_match_ml_dtypes_finfo(spec):
    f, fi = parse(spec), ml_dtypes.finfo(ML[spec])
    assert f.max == float(fi.max)
    assert f.min_normal == float(fi.smallest_normal)
    assert f.min_subnormal == float(fi.smallest_subnormal)
    assert f.eps == float(fi.eps)
    assert (f.bits, f.man, f.exp) == (fi.bits, fi.nmant, fi.nexp)
    assert (f.emax, f.emin) == (fi.maxexp - 1, fi.minexp)


@pytest.mark.parametrize("spec", SMALL_ML)
def test_values_match_ml_dtypes_decoding(spec):
    f, t = parse(spec), ML[spec]
    codes = np.arange(2**f.bits).astype(np.uint16 if f.bits > 8 else np.uint8)
    with np.errstate(invalid="ignore"):  # NaN codes
        decoded = codes.view(t).astype(np.float64)
    assert_same_values(f.values().numpy(), finite_sorted(decoded))
    assert f.has_nan == bool(np.isnan(decoded).any())
    assert f.inf == bool(np.isinf(decoded).any())


@pytest.mark.parametrize("case", P3109, ids=map(p3109_id, P3109))
def test_p3109_matches_gfloat(case):
    f, fi = p3109(*case), gf_p3109(*case)
    assert (f.bits, f.max, f.eps, f.emax) == (fi.k, fi.max, fi.eps, fi.emax)
    assert (f.min_normal, f.min_subnormal) == (fi.smallest_normal, fi.smallest)
    assert (f.signed, f.inf, f.neg_zero) == (fi.is_signed, fi.domain == gfloat.Domain.Extended, fi.has_nz)
    decoded = gfloat.decode_ndarray(fi, np.arange(2**fi.k))
    assert f.has_nan == bool(np.isnan(decoded).any())
    assert_same_values(f.values().numpy(), finite_sorted(decoded))


@pytest.mark.parametrize("name", OCP)
def test_ocp_elements_match_gfloat(name):
    f, fi = get(name), OCP[name]
    assert (f.bits, f.max, f.emax, f.min_normal, f.eps) == (fi.k, fi.max, fi.emax, fi.smallest_normal, fi.eps)
    assert_same_values(f.values().numpy(), finite_sorted(gfloat.decode_ndarray(fi, np.arange(2**fi.k))))


def test_mxint8_element_matches_gfloat_ocp_int8():
    f, fi = get("mxint8").element, gf.format_info_ocp_int8
    assert (f.bits, f.max, f.min, f.emax) == (fi.k, fi.max, fi.min, fi.emax)
    assert_same_values(f.values().numpy(), finite_sorted(gfloat.decode_ndarray(fi, np.arange(256))))


@pytest.mark.parametrize("fmt", [FixedFormat(8, 4), FixedFormat(4, -2), FixedFormat(6, 9, signed=False)], ids=str)
def test_fixed_limits(fmt):
    v = fmt.values().numpy()
    assert (v[0], v[-1], len(v)) == (fmt.min, fmt.max, 2**fmt.wl)
    assert np.all(np.diff(v) == fmt.eps) and fmt.unit_roundoff == fmt.eps / 2


@pytest.mark.parametrize("name", ["fp32", "fp64", "mxfp8_e4m3", "mxint8"])
def test_values_limits(name):
    f = get(name)
    if f.bits > 16:
        with pytest.raises(ValueError, match="16"):
            f.values()
    else:  # block formats: element values times every scale 2**-127 .. 2**127
        v = f.values().numpy()
        assert v[-1] == f.max == math.ldexp(f.element.max, 127) and np.all(np.diff(v) > 0)
        assert v[v > 0][0] == f.min_subnormal == math.ldexp(f.element.min_subnormal, -127)


# -- spec round trip --------------------------------------------------------------------------------
CUSTOM = ["e5m10", "e4m3fn", "e4m3fnuz", "e3m2(inf=false,nan=none)", "e5m2(bias=3)", "e4m3(subnormals=false)",
          "e5m2(neg_zero=false)", "e4m3(signed=false)", "e8m0", "e1m1", "e2m0(inf=false,nan=none)",
          "e11m52", "p3109(8,3)", "p3109(8,4,unsigned,finite)", "p3109(3,1)", "fixed(8,4)", "fixed(8,8,unsigned)",
          "fixed(16,-3)", "mx(fp6_e3m2,16)", "mx(fixed(8,6),32,axis=0)", "mx(e4m3(bias=5),64,axis=-2)",
          "bfp(8,16)", "bfp(4,32,axis=1)", "bm(2,5,16)", "bm(4,3,32,axis=1)"]


@pytest.mark.parametrize("name", names())
def test_registered_names_round_trip(name):
    f = get(name)
    assert str(f) == name and parse(name) == f and parse(str(f)) == f
    assert get(name.upper()) == f  # case-insensitive


@pytest.mark.parametrize("spec", CUSTOM)
def test_custom_specs_round_trip(spec):
    f = parse(spec)
    assert parse(str(f)) == f and str(parse(str(f))) == str(f)


@pytest.mark.parametrize("fmt", [FloatFormat(1, 0, inf=False, nan="none"), FloatFormat(1, 0, inf=False, nan="negzero"),
                                 FloatFormat(1, 0, subnormals=False, inf=False, nan="none")],
                         ids=["e1m0_nonan", "e1m0_negzero_nan", "e1m0_nozero"])
def test_str_of_formats_whose_ieee_sibling_is_impossible(fmt):
    """e1m0 with IEEE specials has no finite value, but these variants are fine formats."""
    assert parse(str(fmt)) == fmt


@st.composite
def float_formats(draw):
    """Any FloatFormat that constructs (the bias stays where max fits in a float64)."""
    exp = draw(st.integers(1, 11))
    kw = draw(st.fixed_dictionaries(dict(
        man=st.integers(0, 52), subnormals=st.booleans(), inf=st.booleans(),
        nan=st.sampled_from(["ieee", "fn", "negzero", "none"]), neg_zero=st.none() | st.booleans(),
        signed=st.booleans())))
    if draw(st.booleans()):
        kw["bias"] = 2 ** (exp - 1) - 1 + draw(st.integers(0 if exp >= 10 else -20, 40))
    try:
        return FloatFormat(exp, **kw)
    except ValueError:
        assume(False)


@st.composite
def formats(draw):
    kind = draw(st.sampled_from(["float", "fixed", "mx", "bfp", "bm"]))
    axis = draw(st.integers(-3, 2))
    block = draw(st.integers(1, 256))
    if kind == "float":
        return draw(float_formats())
    if kind == "fixed":
        return FixedFormat(draw(st.integers(2, 53)), draw(st.integers(-40, 80)), draw(st.booleans()))
    if kind == "mx":
        elem = draw(float_formats() | st.builds(FixedFormat, st.integers(2, 16), st.integers(-4, 20)))
        return MXFormat(elem, block, axis)
    if kind == "bfp":
        return BlockFloat(draw(st.integers(2, 32)), block, axis)
    return BlockMinifloat(draw(st.integers(1, 8)), draw(st.integers(0, 10)), block, axis)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_constructible_format_round_trips(data):
    f = data.draw(formats())
    s = str(f)
    assert parse(s) == f, s
    assert hash(parse(s)) == hash(f)


# -- hashing, immutability, registry ---------------------------------------------------------------------
def test_formats_are_hashable_and_compare_by_value():
    assert hash(get("fp8_e4m3")) == hash(FloatFormat(4, 3, inf=False, nan="fn"))
    assert get("fp8_e4m3") == FloatFormat(4, 3, inf=False, nan="fn")  # the display name is not compared
    table = {get(n): n for n in names()}
    assert len(table) == len(names())  # registered formats are distinct
    assert table[parse("mx(e4m3fn,32)")] == "mxfp8_e4m3"
    assert {parse("bfp(8,32)"), parse("bfp(8,32)"), BlockFloat(8, 32, axis=0)} == {BlockFloat(8, 32), BlockFloat(8, 32, 0)}
    assert MXFormat(get("fp8_e4m3"), 32) == MXFormat("fp8_e4m3", 32) == get("mxfp8_e4m3")


@pytest.mark.parametrize("fmt,field", [(get("fp8_e4m3"), "man"), (FixedFormat(8, 4), "fl"), (get("mxint8"), "block_size"),
                                       (BlockFloat(8, 16), "wl"), (BlockMinifloat(2, 5, 16), "axis")],
                         ids=["float", "fixed", "mx", "bfp", "bm"])
def test_formats_are_immutable(fmt, field):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(fmt, field, 1)


def test_names():
    expected = {"fp64", "fp32", "tf32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "fp8_e5m2fnuz",
                "fp8_e3m4", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "e8m0", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2",
                "mxfp6_e2m3", "mxfp4_e2m1", "mxint8"}
    assert expected <= set(names()) and len(set(names())) == len(names())
    assert all(n == n.lower() for n in names())
    for alias, name in [("fp8_e4m3fn", "fp8_e4m3"), ("e8m0fnu", "e8m0"), ("float32", "fp32"), ("half", "fp16"),
                        ("bfloat16", "bf16"), ("fp4_e2m1fn", "fp4_e2m1")]:
        assert get(alias) == get(name)
    assert get("tf32") == FloatFormat(8, 10) and get("mxint8").element == FixedFormat(8, 6)


# -- errors ---------------------------------------------------------------------------------------------
ERRORS = [
    (lambda: FloatFormat(0, 3), ["exp=0", "[1, 11]"]),
    (lambda: FloatFormat(12, 3), ["exp=12", "[1, 11]"]),
    (lambda: FloatFormat(4, 53), ["man=53", "[0, 52]"]),
    (lambda: FloatFormat(4, -1), ["man=-1", "[0, 52]"]),
    (lambda: FloatFormat(4.0, 3), ["exp=4.0"]),
    (lambda: FloatFormat(True, 3), ["exp=True"]),
    (lambda: FloatFormat(4, 3, bias=5000), ["bias=5000"]),
    (lambda: FloatFormat(4, 3, nan="x"), ["nan='x'", "ieee", "fn", "negzero", "none"]),
    (lambda: FloatFormat(4, 3, nan="negzero", neg_zero=True), ["neg_zero=True", "negzero"]),
    (lambda: FloatFormat(4, 3, signed=False, nan="negzero"), ["negzero", "signed=True"]),
    (lambda: FloatFormat(4, 3, signed=False, neg_zero=True), ["neg_zero=True", "signed=False"]),
    (lambda: FloatFormat(1, 0, nan="fn", inf=True), ["exp=1", "man=0", "no positive finite value"]),
    (lambda: FloatFormat(1, 0), ["exp=1", "man=0", "no positive finite value"]),
    (lambda: FloatFormat(11, 52, bias=-1), ["bias=-1"]),  # max would exceed float64
    (lambda: FixedFormat(1, 0), ["wl=1", "[2, 53]"]),
    (lambda: FixedFormat(54, 0), ["wl=54", "[2, 53]"]),
    (lambda: FixedFormat(0, 0, signed=False), ["wl=0", "[1, 53]"]),
    (lambda: FixedFormat(8, 2000), ["fl=2000", "[-252, 252]"]),
    (lambda: MXFormat(get("fp8_e4m3"), 0), ["block_size=0"]),
    (lambda: MXFormat("fp8_e4m3", 32, axis=100), ["axis=100"]),
    (lambda: MXFormat(get("mxint8")), ["element=", "float or fixed"]),
    (lambda: MXFormat("fp8_e4m4"), ["'fp8_e4m4'", "not a registered name", "parse('fp8_e4m4')", "fp8_e4m3"]),
    (lambda: BlockFloat(1, 32), ["wl=1", "[2, 32]"]),
    (lambda: BlockMinifloat(0, 3, 32), ["exp=0"]),
    (lambda: BlockMinifloat(4, 3, 0), ["block_size=0"]),
    (lambda: p3109(8, 8), ["p=8", "[1, 7]"]),
    (lambda: p3109(1, 1), ["k=1"]),
    (lambda: p3109(8, 3, domain="x"), ["domain='x'"]),
]


@pytest.mark.parametrize("make,parts", ERRORS, ids=[" ".join(p[:1]) for _, p in ERRORS])
def test_impossible_formats_raise_value_error_naming_the_field(make, parts):
    with pytest.raises(ValueError) as err:
        make()
    for part in parts:
        assert part in str(err.value)


@pytest.mark.parametrize("name,close", [("fp8_e4m4", "fp8_e4m3"), ("mxfp8_e4m4", "mxfp8_e4m3"), ("bf61", "bf16"),
                                        ("fp8e5m2", "fp8_e5m2")])
def test_unknown_name_lists_close_matches(name, close):
    for lookup in (get, parse):
        with pytest.raises(mpcompile.FormatError) as err:
            lookup(name)
        assert repr(name) in str(err.value) and close in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, mpcompile.MpcompileError)


MALFORMED = ["mx(fp8_e4m3", "fixed(8,4", "e4m3(bogus=1)", "fixed(8,4))", "fixed(8,4)x", "e4m3$", "(8)", "fixed(,)",
             "e4m3(inf=maybe)", "e4m3(bias=x)", "fixed(8)", "mx(8)", "mx(fp8_e4m3,0)", "mx(mxint8)", "p3109(8,9)",
             "fp8_e4m3()", "fixed(8,4,bias=1)", "mx(fp8_e4m3,32,axis=x)", "e1m0", "mx()", "e11m52(bias=-100)"]


@pytest.mark.parametrize("spec", MALFORMED)
def test_malformed_spec_raises_format_error_quoting_it(spec):
    with pytest.raises(mpcompile.FormatError) as err:
        parse(spec)
    assert repr(spec) in str(err.value)


@pytest.mark.parametrize("spec", ["fixed(8,8,unsinged)", "p3109(8,3,bogus)", "mx(fp8_e4m3,bogus)", "bfp(8,16,x)"])
def test_unknown_word_argument_is_rejected(spec):
    """A misspelt flag must not be dropped silently (``unsinged`` would give a signed format)."""
    with pytest.raises(mpcompile.FormatError) as err:
        parse(spec)
    assert repr(spec) in str(err.value)


def test_empty_spec_and_non_format():
    with pytest.raises(mpcompile.FormatError, match="empty"):
        parse("  ")
    with pytest.raises(mpcompile.FormatError, match="int"):
        parse(8)


def test_a_format_whose_bare_name_is_registered_to_another_reads_back_as_itself():
    ieee_e8m0 = FloatFormat(8, 0)  # IEEE-style, unlike the registered e8m0 (the MX scale)
    assert str(ieee_e8m0) == "e8m0()" and parse(str(ieee_e8m0)) == ieee_e8m0
    assert str(parse("e8m0")) == "e8m0" and parse("e8m0") != ieee_e8m0


def test_a_registered_name_prints_and_parses(monkeypatch):
    from mpcompile.formats import register, registry, table

    monkeypatch.setattr(table, "_TABLE", dict(table._TABLE))  # the registrations are undone after the test
    try:
        mx16 = MXFormat(get("fp8_e4m3"), 16)
        assert str(mx16) == "mx(fp8_e4m3,16)"
        register("mx16_e4m3", mx16)
        assert str(mx16) == "mx16_e4m3" and get("MX16_E4M3") == mx16 and "mx16_e4m3" in names()
        assert str(MXFormat(get("fp8_e4m3"), 16, axis=0)) == "mx(fp8_e4m3,16,axis=0)"
        assert parse("e4m3") == FloatFormat(4, 3)
        register("e4m3", get("fp8_e4m3"))  # a bare spec, registered: it reads as the registered format now
        assert parse("e4m3") == get("fp8_e4m3") and str(FloatFormat(4, 3)) == "e4m3()"
        with pytest.raises(mpcompile.FormatError, match="already names"):
            register("mx16_e4m3", get("mxfp8_e4m3"))
    finally:
        registry._parse_spec.cache_clear()
