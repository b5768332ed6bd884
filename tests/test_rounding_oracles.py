"""``quantize`` against independent implementations, bit for bit (zero mismatches pass).

Oracles: gfloat's ``round_ndarray`` for every mode gfloat has (saturating or not, float32 and
float64 inputs, stochastic with the same random bits), the casts of ml_dtypes and numpy
(round to nearest even), and torch's own casts. Inputs are the hard grids of ``oracles.grid``
plus log-uniform random data. Where mpcompile documents a deviation from gfloat (formats
without inf and NaN, unsigned formats, E8M0 below its range), the documented result is the
expected one instead.
"""
from __future__ import annotations

import gfloat
import ml_dtypes
import numpy as np
import pytest
import torch

from mpcompile import quantize
from mpcompile.formats import FloatFormat, get, parse
from oracles import DTYPES, GFLOAT_FORMATS, assert_bitwise, did, fid, gfloat_round, inputs, to_gfloat

MODES = ["nearest", "nearest_away", "toward_zero", "up", "down"]
# random bits per value; 30 (float32) and 60 (float64) take the integer path (more bits than the float holds)
SR_CASES = [(n, d) for n in (1, 3, 8, 13, 20) for d in DTYPES] + [(30, torch.float32), (60, torch.float64)]


def documented(f: FloatFormat, x: np.ndarray, sat: bool, mode: str,
               bits: np.ndarray | None = None, n: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs where mpcompile deliberately differs from gfloat, and its result there: negative
    input to an unsigned format is +0 where the mode rounds it to 0 (-0 too), else out of range:
    NaN (the lowest value with saturate); in a format without zero (E8M0) every negative input
    is out of range, 0 is NaN (the lowest value with saturate) and positive values below the
    lowest value become it. gfloat leaves negative input to unsigned formats and E8M0's
    underflow unrounded. Whether -a rounds to 0 is gfloat's rounding of a by the mirrored mode
    (round(-a, up) = -round(a, down)), the same random bits for stochastic."""
    low = 0.0 if f.has_zero else f.min_subnormal
    out = np.full_like(x, np.nan)
    mask = np.zeros(x.shape, dtype=bool)
    if not f.signed:
        neg = np.signbit(x) & ~np.isnan(x) & (x != 0)
        to_zero = np.zeros(x.shape, dtype=bool)
        if f.has_zero and neg.any():
            mirrored = {"up": "down", "down": "up"}.get(mode, mode)
            a = gfloat_round(f, -x[neg], mirrored, sat, srbits=None if bits is None else bits[neg], srnumbits=n)
            to_zero[neg] = a == 0
        out[neg & ~to_zero] = low if sat else np.nan
        out[to_zero] = 0.0
        mask |= neg
    if not f.has_zero:
        zero = x == 0
        out[zero] = low if sat else np.nan
        under = (x > 0) & (x < f.min_subnormal)
        out[under] = f.min_subnormal
        mask |= zero | under
    return mask, out


def check_gfloat(f, x: torch.Tensor, got: torch.Tensor, mode: str, sat: bool, bits=None, n: int = 0):
    xn, gn = x.numpy(), got.numpy()
    bn = None if bits is None else bits.numpy()
    mask, expected = documented(f, xn, sat, mode, bn, n)
    # gfloat scales |x| by 2**-(emin - man) in float64: far below a quantum > 1 that underflows
    # (it rounds 5e-324 "up" to 0); test_rounding_fixed_odd's exact reference covers these
    below = (xn != 0) & (np.abs(xn.astype(np.float64)) < np.ldexp(1.0, min(f.emin - f.man - 1022, 0)))
    expected[below], mask = gn[below], mask | below
    expected[~mask] = gfloat_round(f, xn[~mask], mode, sat, srbits=None if bn is None else bn[~mask], srnumbits=n)
    assert_bitwise(xn, gn, expected, f"{f} {mode} saturate={sat} {x.dtype}")


def test_conversion_has_same_values():
    """The oracle's premise: to_gfloat(f) decodes to exactly f.values(), -0 included or not."""
    for f in GFLOAT_FORMATS:
        fi = to_gfloat(f)
        dec = gfloat.decode_ndarray(fi, np.arange(2**fi.k))
        dec = dec[np.isfinite(dec)]
        ours = f.values().numpy()
        assert np.array_equal(np.unique(dec), np.unique(ours)), f
        assert np.any((dec == 0) & np.signbit(dec)) == np.any((ours == 0) & np.signbit(ours)) == f.neg_zero, f
        assert fi.max == f.max and (fi.num_nans > 0) == f.has_nan and (fi.num_infs > 0) == f.inf, f


# -- gfloat -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=did)
@pytest.mark.parametrize("sat", [False, True], ids=["nosat", "sat"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("f", GFLOAT_FORMATS, ids=fid)
def test_gfloat(f, mode, sat, dtype):
    x = inputs(f, dtype)
    check_gfloat(f, x, quantize(x, f, mode, saturate=sat), mode, sat)


@pytest.mark.parametrize("sat", [False, True], ids=["nosat", "sat"])
@pytest.mark.parametrize("n, dtype", SR_CASES, ids=[f"sr{n}-{did(d)}" for n, d in SR_CASES])
@pytest.mark.parametrize("f", GFLOAT_FORMATS, ids=fid)
def test_gfloat_stochastic(f, n, dtype, sat):
    x = inputs(f, dtype)
    g = torch.Generator().manual_seed(1000 * n + sat)
    bits = torch.randint(0, 2**n, x.shape, generator=g, dtype=torch.int64)
    got = quantize(x, f, "stochastic", saturate=sat, sr_bits=n, random_bits=bits)
    check_gfloat(f, x, got, "stochastic", sat, bits, n)


# -- documented deviations, spelled out ---------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=did)
@pytest.mark.parametrize("mode", MODES + ["odd", "stochastic"])
def test_e8m0_specials(mode, dtype):
    f = get("e8m0")
    x = torch.tensor([0.0, -0.0, -1.0, -2.0**-130, -torch.inf, 2.0**-140, 2.0**-127 * 0.75, torch.nan], dtype=dtype)
    tiny = 2.0**-127
    expect = {False: [np.nan] * 5 + [tiny, tiny, np.nan], True: [tiny] * 5 + [tiny, tiny, np.nan]}
    for sat in (False, True):
        got = quantize(x, f, mode, saturate=sat)
        assert_bitwise(x, got, np.array(expect[sat]), f"e8m0 {mode} saturate={sat}")


@pytest.mark.parametrize("mode", MODES + ["odd", "stochastic"])
@pytest.mark.parametrize("name", ["fp6_e3m2", "fp6_e2m3", "fp4_e2m1"])
def test_no_specials_overflow_is_nan(name, mode):
    """Formats with neither inf nor NaN: NaN input and unsaturated overflow give NaN (gfloat raises)."""
    f = get(name)
    x = torch.tensor([torch.nan, torch.inf, -torch.inf, 4 * f.max, -4 * f.max])
    got = quantize(x, f, mode)
    clamps = {"toward_zero": [1, 1], "odd": [1, 1], "up": [0, 1], "down": [1, 0]}.get(mode, [0, 0])
    expect = [np.nan] * 3 + [f.max if clamps[0] else np.nan, -f.max if clamps[1] else np.nan]
    assert_bitwise(x, got, np.array(expect), f"{name} {mode}")
    with pytest.raises(ValueError):
        gfloat.round_ndarray(to_gfloat(f), np.array([np.inf]), sat=False)


# -- ml_dtypes, numpy and torch casts -----------------------------------------------------------
ML_DTYPES = [  # (ml_dtypes / numpy type, our format, saturate to match its overflow)
    ("float8_e4m3fn", "fp8_e4m3", False), ("float8_e5m2", "fp8_e5m2", False),
    ("float8_e4m3fnuz", "fp8_e4m3fnuz", False), ("float8_e5m2fnuz", "fp8_e5m2fnuz", False),
    ("float8_e4m3", "e4m3", False), ("float8_e3m4", "fp8_e3m4", False),
    ("float8_e4m3b11fnuz", "e4m3fnuz(bias=11)", False),
    ("float6_e2m3fn", "fp6_e2m3", True), ("float6_e3m2fn", "fp6_e3m2", True), ("float4_e2m1fn", "fp4_e2m1", True),
    ("float8_e8m0fnu", "e8m0", False), ("bfloat16", "bf16", False),
]


@pytest.mark.parametrize("ml_name, spec, sat", ML_DTYPES, ids=[m[0] for m in ML_DTYPES])
def test_ml_dtypes_nearest(ml_name, spec, sat):
    """ml_dtypes casts from float32 (its float64 casts round twice, through float32)."""
    f = parse(spec)
    assert f.max == float(ml_dtypes.finfo(getattr(ml_dtypes, ml_name)).max)
    x = inputs(f, torch.float32)
    if not f.has_nan:  # ml_dtypes turns NaN into 0 where the type has no NaN; we return NaN
        x = x[~x.isnan()]
    if f == get("e8m0"):
        a = x.abs()
        tie = torch.frexp(a)[0] == 0.75  # ml_dtypes breaks ties up, gfloat and we to the even code
        # ml_dtypes rounds float32 subnormals in (2**-127, 2**-126) up to 2**-126 (0x1.000004p-127 too)
        sub = (a > 2.0**-127) & (a < 2.0**-126)
        x = x[~tie & ~sub]
    expected = x.numpy().astype(getattr(ml_dtypes, ml_name)).astype(np.float32)
    assert_bitwise(x, quantize(x, f, saturate=sat), expected, f"ml_dtypes.{ml_name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=did)
def test_numpy_float16(dtype):
    f = get("fp16")
    x = inputs(f, dtype)
    with np.errstate(over="ignore"):
        expected = x.numpy().astype(np.float16)
    assert_bitwise(x, quantize(x, f), expected, f"numpy float16 from {dtype}")


TORCH_CASTS = [(torch.float8_e4m3fn, "fp8_e4m3"), (torch.float8_e5m2, "fp8_e5m2"),
               (torch.float8_e4m3fnuz, "fp8_e4m3fnuz"), (torch.float8_e5m2fnuz, "fp8_e5m2fnuz"),
               (torch.bfloat16, "bf16"), (torch.float16, "fp16")]


@pytest.mark.parametrize("tdtype, name", TORCH_CASTS, ids=[n for _, n in TORCH_CASTS])
def test_torch_cast(tdtype, name):
    """torch's casts from float32 (from float64 it rounds twice) on finite in-range data."""
    f = get(name)
    x = inputs(f, torch.float32)
    x = x[torch.isfinite(x) & (x.abs() <= f.max)]
    assert_bitwise(x, quantize(x, f), x.to(tdtype).float(), f"torch {tdtype}")


# -- half-precision inputs ----------------------------------------------------------------------
HALF_FORMATS = ["fp8_e5m2", "fp4_e2m1", "p3109(8,1,unsigned)", "bf16", "fp16", "e8m0"]
HALF_CASES = [(d, s) for d in (torch.float16, torch.bfloat16) for s in HALF_FORMATS
              if torch.equal(parse(s).values().to(d).double(), parse(s).values())]  # d holds every value


@pytest.mark.parametrize("mode", MODES + ["odd", "stochastic"])
@pytest.mark.parametrize("dtype, spec", HALF_CASES, ids=[f"{did(d)}-{s}" for d, s in HALF_CASES])
def test_half_inputs(dtype, spec, mode):
    """Every float16/bfloat16 bit pattern: result in the input dtype, equal to quantize of the
    float32 upcast (formats whose values the half dtype holds)."""
    f = parse(spec)
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    kw = {}
    if mode == "stochastic":
        kw = dict(sr_bits=8, random_bits=torch.randint(0, 256, x.shape, generator=torch.Generator().manual_seed(5)))
    got = quantize(x, f, mode, **kw)
    assert got.dtype == dtype and got.shape == x.shape
    assert_bitwise(x, got, quantize(x.float(), f, mode, **kw), f"{spec} {mode} from {dtype}")
