"""``quantize`` against exact references written here, bit for bit (zero mismatches pass).

* Fixed point: each input becomes the Fraction x * 2**fl, rounded to an integer by the mode,
  then overflow is NaN, or clamps to [min, max] with saturate and for the directed modes that
  round toward the range (toward_zero and odd always, up below, down above); negative input to
  an unsigned format is +0 where the mode rounds it to 0, else out of range: NaN (0 with saturate).
* Float formats, ``odd`` (no other library has it) and every mode for the formats gfloat cannot
  describe (flush to zero, a 1-bit exponent): the input is placed on the sorted list of the
  format's magnitudes (exact float comparisons, Fraction midpoints), truncated, and stepped
  one value away by the mode. For ``odd``: when inexact and the truncated code is even. A value
  past max steps to a virtual next value (max + its ulp), which is overflow: inf/NaN, or max
  where the mode clamps (toward_zero, odd, up below, down above) or saturate is on.
* Argument errors.
"""
from __future__ import annotations

import math
import os
from bisect import bisect_right
from fractions import Fraction
from functools import lru_cache

import numpy as np
import pytest
import torch

from mpcompile import quantize
from mpcompile.formats import FixedFormat, FloatFormat, get, parse
from oracles import DTYPES, FLOAT_FORMATS, NON_GFLOAT, assert_bitwise, did, fid, fixed_inputs, float_inputs

MODES = ["nearest", "nearest_away", "toward_zero", "up", "down", "odd"]
SATS = [False, True]


def _clamps(mode: str, neg: bool, sat: bool) -> bool:
    """Whether overflow of a finite value becomes the extreme value instead of inf/NaN."""
    return sat or mode in ("toward_zero", "odd") or (mode == "up" and neg) or (mode == "down" and not neg)


# -- fixed point --------------------------------------------------------------------------------
def _round_int(q: Fraction, mode: str, bits: int = 0, n: int = 0) -> int:
    """q rounded to an integer on its magnitude, as the mode says."""
    s, a = (-1 if q < 0 else 1), abs(q)
    t = math.floor(a)
    frac = a - t
    if mode == "nearest":
        away = frac > Fraction(1, 2) or (frac == Fraction(1, 2) and t % 2 == 1)
    elif mode == "nearest_away":
        away = frac >= Fraction(1, 2)
    elif mode == "toward_zero":
        away = False
    elif mode == "up":
        away = frac > 0 and s > 0
    elif mode == "down":
        away = frac > 0 and s < 0
    elif mode == "odd":
        away = frac > 0 and t % 2 == 0
    else:  # stochastic (gfloat's): frac to n bits, ties to even, plus the random bits
        away = round(frac * 2**n) + bits >= 2**n
    return s * (t + int(away))


def ref_fixed(f: FixedFormat, x: float, mode: str, sat: bool, bits: int = 0, n: int = 0) -> float:
    if math.isnan(x):
        return math.nan
    neg = math.copysign(1.0, x) < 0
    if math.isinf(x):  # (-inf in an unsigned format: its min is 0)
        return math.ldexp(f.min_int if neg else f.max_int, -f.fl) if sat else math.nan
    k = _round_int(_scaled(x, f.fl), mode, bits, n)
    if not f.signed and k < 0:  # out of range even where the mode would clamp an overflow
        return 0.0 if sat else math.nan
    if not f.min_int <= k <= f.max_int:
        if not _clamps(mode, neg, sat):
            return math.nan
        k = min(max(k, f.min_int), f.max_int)
    return float(k / _scaled(1.0, f.fl)) + 0.0  # +0.0: a zero result is +0


@lru_cache(maxsize=None)
def _scaled(x: float, fl: int) -> Fraction:
    """x * 2**fl, exactly (cached: every mode and saturate flag asks again)."""
    return Fraction(x) * Fraction(2) ** fl


FIXED = [FixedFormat(8, 4), FixedFormat(8, 4, signed=False), FixedFormat(4, 0), FixedFormat(2, 1),
         FixedFormat(1, 0, signed=False), FixedFormat(5, 7), FixedFormat(6, -3), FixedFormat(12, 0, signed=False),
         FixedFormat(16, 8), FixedFormat(8, 140), FixedFormat(32, 16)]


def _expected(ref, f, x: torch.Tensor, *args, bits=None) -> np.ndarray:
    xs = x.double().tolist()
    if bits is None:
        out = [ref(f, v, *args) for v in xs]
    else:
        out = [ref(f, v, *args, b) for v, b in zip(xs, bits.tolist())]
    exact = np.array(out, dtype=np.float64)
    got = exact.astype(x.numpy().dtype)
    # a clamped max the dtype cannot hold (fixed(32,16) in float32) is held as the largest
    # dtype value inside the format: round toward zero, never out of the format
    with np.errstate(invalid="ignore"):
        outside = np.abs(got.astype(np.float64)) > np.abs(exact)
    got[outside] = np.nextafter(got[outside], np.zeros_like(got[outside]))
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=did)
@pytest.mark.parametrize("sat", SATS, ids=["nosat", "sat"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("f", FIXED, ids=str)
def test_fixed(f, mode, sat, dtype):
    x = fixed_inputs(f, dtype)
    got = quantize(x, f, mode, saturate=sat)
    assert_bitwise(x, got, _expected(ref_fixed, f, x, mode, sat), f"{f} {mode} saturate={sat} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=did)
@pytest.mark.parametrize("n", [4, 23, 30], ids=lambda n: f"sr{n}")
@pytest.mark.parametrize("f", [FixedFormat(8, 4), FixedFormat(6, -3), FixedFormat(8, 4, signed=False)], ids=str)
def test_fixed_stochastic(f, n, dtype):
    x = fixed_inputs(f, dtype)
    bits = torch.randint(0, 2**n, x.shape, generator=torch.Generator().manual_seed(n), dtype=torch.int64)
    got = quantize(x, f, "stochastic", sr_bits=n, random_bits=bits)
    expected = _expected(lambda f, v, b: ref_fixed(f, v, "stochastic", False, b, n), f, x, bits=bits)
    assert_bitwise(x, got, expected, f"{f} stochastic sr_bits={n} {dtype}")


@pytest.mark.parametrize("mode", MODES)
def test_unsigned_fixed_saturate_keeps_no_negative_zero(mode):
    """Fixed point has no -0: -0 input gives +0, also where torch runs vectorised (many elements)."""
    x = torch.full((64,), -0.0)
    for f in (FixedFormat(8, 4, signed=False), FixedFormat(8, 4)):
        for sat in SATS:
            assert_bitwise(x, quantize(x, f, mode, saturate=sat), np.zeros(64), f"{f} {mode} saturate={sat}")


# -- unsigned formats: negative input that rounds to 0 -----------------------------------------
NEG_TINY = [-1e-5, -(2.0**-9), -(2.0**-8), -0.5]  # in fixed(8,7,unsigned) (step 2**-7): 0.00128, 1/4, 1/2, 64 steps
NEG_TINY_EXPECTED = {  # +0 where the mode rounds the magnitude to 0, else out of range (NaN)
    "nearest": [0.0, 0.0, 0.0, math.nan],  # 1/2 step: the tie goes to the even 0
    "nearest_away": [0.0, 0.0, math.nan, math.nan],
    "toward_zero": [0.0, 0.0, 0.0, math.nan],
    "up": [0.0, 0.0, 0.0, math.nan],  # toward +inf: -tiny -> 0; -0.5 is exact, out of range
    "down": [math.nan] * 4,  # toward -inf: -tiny -> -2**-7
    "odd": [math.nan] * 4,  # truncated to the even 0 and inexact: the odd -2**-7
}


def _triton_runs() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def _quantize_both(x: torch.Tensor, f, mode: str, **kw) -> list[tuple[str, torch.Tensor]]:
    """quantize by the reference kernel and, where Triton runs (float32), the Triton one."""
    from mpcompile import set_quantize_kernel
    kernels = ["reference"] + (["triton"] if x.dtype == torch.float32 and _triton_runs() else [])
    out = []
    try:
        for k in kernels:
            set_quantize_kernel(k)
            y = x.cuda() if k == "triton" and os.environ.get("TRITON_INTERPRET") != "1" else x
            out.append((k, quantize(y, f, mode, **kw).cpu()))
    finally:
        set_quantize_kernel(None)
    return out


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no silent fallback from the Triton kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=did)
@pytest.mark.parametrize("mode", MODES)
def test_unsigned_negative_rounding_to_zero_is_zero(mode, dtype):
    """A negative input whose magnitude rounds to 0 is +0 in an unsigned format (0 is in its range);
    only one that rounds to a nonzero magnitude is out of range: NaN, 0 with saturate."""
    f = parse("fixed(8,7,unsigned)")
    x = torch.tensor(NEG_TINY, dtype=dtype)
    for sat in SATS:
        expected = np.array([0.0] * 4 if sat else NEG_TINY_EXPECTED[mode])
        for kernel, got in _quantize_both(x, f, mode, saturate=sat):
            assert_bitwise(x, got, expected, f"{f} {mode} saturate={sat} {dtype} {kernel}")
            assert torch.equal(got.isnan(), torch.from_numpy(np.isnan(expected)))
            assert torch.equal(got.nan_to_num(7.0), torch.from_numpy(np.nan_to_num(expected, nan=7.0)).to(dtype))


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=did)
def test_unsigned_negative_rounding_to_zero_stochastic(dtype):
    """-2**-9 is 1/4 step of fixed(8,7,unsigned): with 2 random bits it rounds away (out of range)
    only for bits 3; -1e-5 (0.00128 steps, 0 in 2 bits) never does."""
    f = parse("fixed(8,7,unsigned)")
    x = torch.tensor([-(2.0**-9)] * 4 + [-1e-5] * 4, dtype=dtype)
    bits = torch.tensor([0, 1, 2, 3] * 2)
    expected = np.array([0.0, 0.0, 0.0, math.nan] + [0.0] * 4)
    for kernel, got in _quantize_both(x, f, "stochastic", sr_bits=2, random_bits=bits):
        assert_bitwise(x, got, expected, f"{f} stochastic {dtype} {kernel}")


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=did)
@pytest.mark.parametrize("mode", MODES)
def test_unsigned_float_negative_rounding_to_zero_is_zero(mode, dtype):
    """The same rule for an unsigned float format (p3109(8,1,unsigned): 0, then m = its least value);
    E8M0 has no zero: every negative input stays out of range."""
    f = parse("p3109(8,1,unsigned)")
    m = f.min_subnormal
    x = torch.tensor([-m / 4, -m / 2, -m * 0.75, -m, -0.0], dtype=dtype)
    nan = math.nan
    expected = {"nearest": [0.0, 0.0, nan, nan], "nearest_away": [0.0, nan, nan, nan],
                "toward_zero": [0.0, 0.0, 0.0, nan], "up": [0.0, 0.0, 0.0, nan],
                "down": [nan] * 4, "odd": [nan] * 4}[mode] + [0.0]
    for sat in SATS:
        for kernel, got in _quantize_both(x, f, mode, saturate=sat):
            assert_bitwise(x, got, np.array([0.0] * 5 if sat else expected), f"{f} {mode} saturate={sat} {kernel}")
    e8m0 = get("e8m0")
    for kernel, got in _quantize_both(torch.tensor([-(2.0**-140), -1.0], dtype=dtype), e8m0, mode):
        assert_bitwise(x[:2], got, np.array([nan, nan]), f"e8m0 {mode} {kernel}")


# -- float formats: odd, and every mode where gfloat cannot serve ------------------------------
@lru_cache(maxsize=None)
def _table(f: FloatFormat):
    """Sorted magnitudes, the value after each (max's: max + its ulp, a virtual overflow value),
    the midpoints between them (checked exact as floats against Fractions), and whether each
    magnitude's code is odd."""
    mags = sorted(set(f.values().abs().tolist()))
    e = math.frexp(f.max)[1] - 1
    nxt = mags[1:] + [f.max + math.ldexp(1.0, max(e, f.emin) - f.man)]
    mids = [(lo + hi) / 2 for lo, hi in zip(mags, nxt)]
    assert all(Fraction(m) == (Fraction(lo) + Fraction(hi)) / 2 for lo, hi, m in zip(mags, nxt, mids))

    def odd(v: float) -> bool:
        if v == 0:
            return False
        e = math.frexp(v)[1] - 1
        if f.man == 0:  # the code is the exponent field
            return (e + f.bias) % 2 == 1
        return int(Fraction(v) / Fraction(2) ** (max(e, f.emin) - f.man)) % 2 == 1

    return mags, nxt, mids, [odd(v) for v in mags]


def ref_float(f: FloatFormat, x: float, mode: str, sat: bool) -> float:
    if math.isnan(x):
        return math.nan
    neg = math.copysign(1.0, x) < 0
    low = f.min_subnormal if not f.has_zero else 0.0
    if not f.signed and not f.has_zero and neg and x != 0:  # E8M0-like: every negative value is out of range
        return low if sat else math.nan
    a = abs(x)
    if a == 0 and not f.has_zero:  # E8M0-like: zero is not a value
        return low if sat else math.nan
    mags, nxt, mids, odd = _table(f)
    if math.isinf(a):
        r = f.max if sat else (math.inf if f.inf else math.nan)
    else:
        i = bisect_right(mags, a) - 1
        if i < 0:  # below the lowest value of a format without zero: clamp up, every mode
            r = mags[0]
        elif mags[i] == a:
            r = a
        else:
            away = {"nearest": a > mids[i] or (a == mids[i] and odd[i]), "nearest_away": a >= mids[i],
                    "toward_zero": False, "up": not neg, "down": neg, "odd": not odd[i]}[mode]
            r = nxt[i] if away else mags[i]
            if r > f.max:
                r = f.max if _clamps(mode, neg, sat) else (math.inf if f.inf else math.nan)
    if not f.signed:  # negative input is out of range unless it rounds to 0 (then +0)
        return (low if sat else math.nan) if neg and r != 0 else r
    if r == 0:
        return -0.0 if neg and f.neg_zero else 0.0
    return -r if neg else r


ODD_FORMATS = FLOAT_FORMATS
ALL_MODE_FORMATS = NON_GFLOAT + [get("fp8_e4m3"), get("e8m0"), parse("p3109(8,1)"), FloatFormat(5, 2, bias=-20),
                                 FloatFormat(8, 3, bias=150)]


@pytest.mark.parametrize("dtype", DTYPES, ids=did)
@pytest.mark.parametrize("sat", SATS, ids=["nosat", "sat"])
@pytest.mark.parametrize("f", ODD_FORMATS, ids=fid)
def test_odd(f, sat, dtype):
    x = float_inputs(f, dtype)
    got = quantize(x, f, "odd", saturate=sat)
    assert_bitwise(x, got, _expected(ref_float, f, x, "odd", sat), f"{f} odd saturate={sat} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=did)
@pytest.mark.parametrize("sat", SATS, ids=["nosat", "sat"])
@pytest.mark.parametrize("mode", [m for m in MODES if m != "odd"])
@pytest.mark.parametrize("f", ALL_MODE_FORMATS, ids=fid)
def test_float_exact(f, mode, sat, dtype):
    x = float_inputs(f, dtype)
    got = quantize(x, f, mode, saturate=sat)
    assert_bitwise(x, got, _expected(ref_float, f, x, mode, sat), f"{f} {mode} saturate={sat} {dtype}")


def test_odd_examples():
    """Hand-checked: fp8_e4m3 around 1 (spacing 1/8), the subnormals, and max clamping."""
    x = torch.tensor([1.01, 1.13, 1.2, -1.01, 0.0001, -0.0001, 1000.0, torch.inf, -torch.inf, -0.0])
    expected = [1.125, 1.125, 1.125, -1.125, 2.0**-9, -(2.0**-9), 448.0, torch.nan, torch.nan, -0.0]
    assert_bitwise(x, quantize(x, "fp8_e4m3", "odd"), np.array(expected), "fp8_e4m3 odd")
    expected[7:9] = [448.0, -448.0]
    assert_bitwise(x, quantize(x, "fp8_e4m3", "odd", saturate=True), np.array(expected), "fp8_e4m3 odd sat")


@pytest.mark.parametrize("mode", ["up", "down", "odd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=did)
def test_tiny_input_coarse_format(dtype, mode):
    """A format whose smallest step exceeds 1 (bias < -man, or fixed point with fl < 0): the
    smallest positive input still rounds away from zero when the mode says so."""
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # smallest subnormal
    x = torch.tensor([tiny, -tiny], dtype=dtype)
    for f, step in ((FloatFormat(5, 2, bias=-20), 2.0**19), (FixedFormat(6, -3), 8.0)):
        expected = {"up": [step, -0.0], "down": [0.0, -step], "odd": [step, -step]}[mode]
        if isinstance(f, FixedFormat):
            expected = [e + 0.0 for e in expected]  # fixed point has no -0
        assert_bitwise(x, quantize(x, f, mode), np.array(expected), f"{f} {mode} {dtype}")


# -- argument errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.bool], ids=did)
def test_integer_tensor_raises(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.zeros(3, dtype=dtype), "fp8_e4m3")


def test_unknown_rounding_raises():
    with pytest.raises(ValueError, match="rounding='nearest_even'"):
        quantize(torch.zeros(3), "fp8_e4m3", "nearest_even")


@pytest.mark.parametrize("shape", [(4,), (3, 1), (1, 3), ()], ids=str)
def test_random_bits_wrong_shape_raises(shape):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="random_bits"):
        quantize(x, "fp8_e4m3", "stochastic", sr_bits=4, random_bits=torch.zeros(shape, dtype=torch.int64))
