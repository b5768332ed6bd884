"""Algebraic properties of ``mpcompile.quantize`` that hold for every format and mode.

The oracle is the property itself (idempotence, monotonicity, sign symmetry, membership in
``fmt.values()``, round-to-odd parity, directed-rounding bounds) checked with hypothesis on
values drawn on, between and around each format's grid; and, for stochastic rounding,
exact counting over every random-bit pattern plus a statistical unbiasedness check.
"""
from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpcompile
from mpcompile import ROUNDING_MODES
from mpcompile.formats import BlockFloat, BlockFormat, BlockMinifloat, FixedFormat, FloatFormat, p3109, parse
from mpcompile.rounding import default_sr_bits

DET_MODES = [m for m in ROUNDING_MODES if m != "stochastic"]
SCALAR = {
    "fp8_e4m3": parse("fp8_e4m3"), "fp8_e5m2": parse("fp8_e5m2"), "fp8_e4m3fnuz": parse("fp8_e4m3fnuz"),
    "fp6_e2m3": parse("fp6_e2m3"), "fp4_e2m1": parse("fp4_e2m1"), "bf16": parse("bf16"), "fp16": parse("fp16"),
    "e8m0": parse("e8m0"), "e4m3_ftz": FloatFormat(4, 3, subnormals=False), "e3m0": FloatFormat(3, 0),
    "p3109_8_3": p3109(8, 3), "p3109_8_1": p3109(8, 1), "p3109_6_4_unsigned": p3109(6, 4, signed=False),
    "fixed_8_4": FixedFormat(8, 4), "fixed_8_8_unsigned": FixedFormat(8, 8, signed=False),
}
BLOCK = {"mxfp8_e4m3": parse("mxfp8_e4m3"), "mxfp4_e2m1": parse("mxfp4_e2m1"), "mxint8": parse("mxint8"),
         "bfp6_8": BlockFloat(6, 8), "bm_e2m3_8": BlockMinifloat(2, 3, 8)}
ALL = {**SCALAR, **BLOCK}
SIGNED = {k: f for k, f in SCALAR.items() if f.signed}
PROP = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=None)
def all_values(fmt) -> torch.Tensor:
    return fmt.values()


@functools.lru_cache(maxsize=None)
def grid(fmt) -> np.ndarray:
    """The non-negative values of a scalar format (or of a block format's element)."""
    elem = fmt.element if isinstance(fmt, BlockFormat) else fmt
    return np.unique(np.abs(all_values(elem).numpy()))


@st.composite
def tensors(draw, fmt, dtypes=(torch.float32, torch.float64), max_size=48):
    """Values on the grid, at midpoints (ties), just off the grid, log-uniform over the range
    and anywhere in float32; block formats get their element grid times a random 2**k."""
    g = grid(fmt)
    i = st.integers(0, len(g) - 2)
    lo, hi = int(np.floor(np.log2(g[1]))) - 3, int(np.ceil(np.log2(g[-1]))) + 2
    one = st.one_of(
        i.map(lambda k: g[k]),
        i.map(lambda k: (g[k] + g[k + 1]) / 2),
        st.tuples(i, st.floats(-1 / 16, 1 / 16)).map(lambda t: g[t[0] + 1] * (1 + t[1])),
        st.tuples(st.floats(1, 2), st.integers(lo, hi)).map(lambda t: t[0] * 2.0 ** t[1]),
        st.floats(width=32, allow_nan=False),
    )
    vals = draw(st.lists(st.tuples(one, st.booleans()), min_size=1, max_size=max_size))
    x = np.array([-v if s else v for v, s in vals], dtype=np.float64)
    if isinstance(fmt, BlockFormat):
        x = x * 2.0 ** draw(st.integers(-100, 100))
    with np.errstate(over="ignore"):  # beyond float32: inf, on purpose
        x = x.astype(np.float32)
    return torch.tensor(x, dtype=draw(st.sampled_from(dtypes)))


def same(a: torch.Tensor, b: torch.Tensor, signed_zero: bool = True) -> bool:
    eq = a == b
    if signed_zero:
        eq &= torch.signbit(a) == torch.signbit(b)
    return bool((eq | (torch.isnan(a) & torch.isnan(b))).all())


def twos_complement_edge(q: torch.Tensor, fmt) -> torch.Tensor:
    """Elements of blocks whose largest magnitude is a negative power of two with no positive
    partner: the integer element -2**(wl-1) (MXINT8's -2). Quantizing such a block again finds
    amax = 2**(s+1) and a scale one step up, so these blocks are (by the spec) not idempotent."""
    if not (isinstance(fmt, BlockFormat) and isinstance(fmt.element, FixedFormat)):
        return torch.zeros(q.shape, dtype=torch.bool)
    n, bs = q.numel(), fmt.block_size
    b = torch.nn.functional.pad(q.double(), (0, (-n) % bs)).reshape(-1, bs)
    amax = b.abs().amax(-1, keepdim=True)
    edge = (b.amin(-1, keepdim=True) == -amax) & (b.amax(-1, keepdim=True) < amax) & (torch.frexp(amax)[0] == 0.5)
    return edge.expand(b.shape).reshape(-1)[:n]


def fixed_bits(x: torch.Tensor, fmt, seed: int) -> dict:
    n = default_sr_bits(fmt, x.dtype)
    g = torch.Generator().manual_seed(seed)
    return dict(random_bits=torch.randint(0, 2**n, x.shape, generator=g, dtype=torch.int64))


# -- idempotence -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ALL.values(), ids=ALL.keys())
@PROP
@given(data=st.data(), seed=st.integers(0, 2**31), saturate=st.booleans())
def test_idempotent(fmt, saturate, data, seed):
    x = data.draw(tensors(fmt))
    for mode in ROUNDING_MODES:
        kw = fixed_bits(x, fmt, seed) if mode == "stochastic" else {}
        q = mpcompile.quantize(x, fmt, mode, saturate=saturate, **kw)
        keep = ~twos_complement_edge(q, fmt)
        assert same(mpcompile.quantize(q, fmt, mode, saturate=saturate, **kw)[keep], q[keep]), (mode, x, q)


# -- monotonicity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", SCALAR.values(), ids=SCALAR.keys())
@PROP
@given(data=st.data(), saturate=st.booleans())
def test_monotonic(fmt, saturate, data):
    x = data.draw(tensors(fmt)).sort().values
    for mode in DET_MODES:
        q = mpcompile.quantize(x, fmt, mode, saturate=saturate)
        q = q[~torch.isnan(q)]  # NaN: overflow of a format without inf (or outside an unsigned one)
        assert bool((q[1:] >= q[:-1]).all()), (mode, x, q)


# -- sign symmetry ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", SIGNED.values(), ids=SIGNED.keys())
@PROP
@given(data=st.data())
def test_sign_symmetry(fmt, data):
    x = data.draw(tensors(fmt))
    if isinstance(fmt, FixedFormat):  # two's complement: -2**(wl-1) has no positive partner
        x = x[x.abs() <= fmt.max]
    sz = bool(fmt.neg_zero) if isinstance(fmt, FloatFormat) else False  # fnuz/P3109/fixed: 0 has one sign
    q = lambda v, m: mpcompile.quantize(v, fmt, m)
    for mode in ("nearest", "nearest_away", "toward_zero", "odd"):
        assert same(q(-x, mode), -q(x, mode), sz), (mode, x)
    assert same(q(-x, "up"), -q(x, "down"), sz), x
    assert same(q(-x, "down"), -q(x, "up"), sz), x


# -- membership ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ALL.values(), ids=ALL.keys())
@PROP
@given(data=st.data(), seed=st.integers(0, 2**31), saturate=st.booleans())
def test_every_finite_result_is_a_value_of_the_format(fmt, saturate, data, seed):
    x = data.draw(tensors(fmt))
    values = all_values(fmt)
    elem = fmt.element if isinstance(fmt, BlockFormat) else fmt
    has_nz = isinstance(elem, FloatFormat) and elem.neg_zero
    for mode in ROUNDING_MODES:
        kw = fixed_bits(x, fmt, seed) if mode == "stochastic" else {}
        q = mpcompile.quantize(x, fmt, mode, saturate=saturate, **kw).double()
        fin = q[torch.isfinite(q)]
        member = values[torch.searchsorted(values, fin).clamp(max=len(values) - 1)] == fin
        assert bool(member.all()), (mode, fin[~member])
        if not has_nz:
            assert not bool(((fin == 0) & torch.signbit(fin)).any()), (mode, x)
        if saturate and not isinstance(fmt, BlockFormat):  # (blocks: +-max * 2**127 overflows float32)
            assert not bool(torch.isinf(q).any()), (mode, x)


@pytest.mark.parametrize("n", [1, 7, 8, 16, 33])
@pytest.mark.parametrize("saturate", [False, True], ids=["nosat", "sat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fmt", ["fixed(8,8,unsigned)", "fixed(8,4)", "p3109(8,3,unsigned)", "fp8_e4m3fnuz", "mxint8"])
def test_negative_zero_only_where_the_format_has_it(fmt, dtype, saturate, n):
    x = torch.full((n,), -0.0, dtype=dtype)
    for mode in DET_MODES:
        q = mpcompile.quantize(x, fmt, mode, saturate=saturate)
        assert q.eq(0).all() and not torch.signbit(q).any(), (mode, q)


# -- round to odd ---------------------------------------------------------------------------------------
ODD_FORMATS = {k: SCALAR[k] for k in ("fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "fp6_e2m3", "fp4_e2m1", "bf16",
                                      "fp16", "p3109_8_3", "p3109_6_4_unsigned", "fixed_8_4", "fixed_8_8_unsigned")}


@pytest.mark.parametrize("fmt", ODD_FORMATS.values(), ids=ODD_FORMATS.keys())
@PROP
@given(data=st.data())
def test_odd_lands_on_odd_codes_unless_exact(fmt, data):
    x = data.draw(tensors(fmt))
    q = mpcompile.quantize(x, fmt, "odd").double()
    g = torch.tensor(grid(fmt))
    clamped = q.abs() == g[-1]  # odd overflow clamps to max (or to the most negative fixed-point value)
    if isinstance(fmt, FixedFormat):
        clamped |= q == fmt.min
    check = torch.isfinite(q) & (q != x.double()) & ~clamped
    if isinstance(fmt, FixedFormat):
        code = (q[check].abs() * 2.0**fmt.fl).long()
    else:
        code = torch.searchsorted(g, q[check].abs())  # index among the non-negative values = magnitude code
    assert bool((code % 2 == 1).all()), (x[check], q[check])


# -- directed modes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", SCALAR.values(), ids=SCALAR.keys())
@PROP
@given(data=st.data())
def test_directed_modes_bound_x(fmt, data):
    x = data.draw(tensors(fmt)).double()
    q = {m: mpcompile.quantize(x, fmt, m) for m in ("down", "up", "toward_zero")}
    # below the smallest value of a format without zero (E8M0) every mode gives that value
    below = (x.abs() < fmt.min_subnormal) if isinstance(fmt, FloatFormat) and not fmt.has_zero else torch.zeros_like(x, dtype=torch.bool)
    ok = lambda c, m: bool((c | torch.isnan(q[m]) | below).all())
    assert ok(q["down"] <= x, "down") and ok(x <= q["up"], "up"), x
    assert ok(q["toward_zero"].abs() <= x.abs(), "toward_zero"), x
    # NaN only outside the format's range: beyond max/min, below zero if unsigned, at zero if no zero
    if isinstance(fmt, FixedFormat):
        outside = (x > fmt.max) | (x < fmt.min)
    else:
        outside = (x.abs() > fmt.max) | ((x < 0) & (not fmt.signed)) | below
    for m, r in q.items():
        assert bool((~torch.isnan(r) | outside).all()), (m, x[torch.isnan(r) & ~outside])


# -- stochastic rounding -----------------------------------------------------------------------------------
def _away(x: torch.Tensor, fmt) -> torch.Tensor:
    """The neighbour away from zero (stochastic rounding rounds the magnitude)."""
    return torch.where(x < 0, mpcompile.quantize(x, fmt, "down"), mpcompile.quantize(x, fmt, "up"))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "bf16", "fixed(8,4)", "p3109(8,3)"])
@pytest.mark.parametrize("frac", [0.1, 0.3, 0.5, 0.77, 0.96])
def test_stochastic_is_unbiased(fmt, frac):
    n = 20000
    f = parse(fmt)
    x = []  # (lo + frac * ulp) in a normal binade, a subnormal one (where the format has them), negated
    for lo, ulp in ((1.25, f.eps), (f.min_subnormal * 2, f.min_subnormal)):
        x += [lo + frac * ulp, -(lo + frac * ulp)]
    x = torch.tensor(x, dtype=torch.float32)
    draws = mpcompile.quantize(x.repeat(n, 1), f, "stochastic", generator=torch.Generator().manual_seed(1234))
    mean = draws.double().mean(0)
    ulp = (_away(x, f) - mpcompile.quantize(x, f, "toward_zero")).double().abs()
    # One draw is lo or lo + ulp, so its standard deviation is ulp*sqrt(p(1-p)) <= ulp/2; the mean
    # of n draws has standard error <= ulp / (2 sqrt(n)). Allow 5 of those (fixed seed: no flakes).
    assert bool(((mean - x.double()).abs() <= 5 * ulp / (2 * n**0.5)).all()), (x, mean)


def test_stochastic_generator_reproducible_and_seed_dependent():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    sr = lambda seed: mpcompile.quantize(x, "fp8_e4m3", "stochastic", generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sr(5), sr(5))
    assert not torch.equal(sr(5), sr(6))
    a, b = sr(5), sr(6)
    assert 0.2 < (a != b).double().mean() < 0.8  # inexact everywhere: about half the draws differ


def test_stochastic_global_seed_reproducible():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.manual_seed(42)
    a = mpcompile.quantize(x, "bf16", "stochastic")
    torch.manual_seed(42)
    b = mpcompile.quantize(x, "bf16", "stochastic")
    c = mpcompile.quantize(x, "bf16", "stochastic")
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1", "fixed(8,4)", "mxfp8_e4m3", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_stochastic_explicit_bits_extremes(fmt, dtype):
    f = parse(fmt)
    n = default_sr_bits(f, dtype)
    x = torch.tensor([1.3, -1.3, 2.71, -0.4, 0.0099, 1.0 + 2**-20], dtype=dtype)
    zeros, ones = torch.zeros(x.shape, dtype=torch.int64), torch.full(x.shape, 2**n - 1, dtype=torch.int64)
    state = torch.get_rng_state()
    lo = mpcompile.quantize(x, f, "stochastic", random_bits=zeros)
    assert torch.equal(lo, mpcompile.quantize(x, f, "stochastic", random_bits=zeros))
    assert torch.equal(torch.get_rng_state(), state)  # random_bits replaces the generator
    assert torch.equal(lo, mpcompile.quantize(x, f, "toward_zero"))
    assert torch.equal(mpcompile.quantize(x, f, "stochastic", random_bits=ones), _away(x, f))
    assert not torch.equal(lo, _away(x, f))  # the test values are inexact


@pytest.mark.parametrize("fmt,dtype", [("bf16", torch.float32), ("fp8_e4m3", torch.float32),
                                       ("fp16", torch.float32)], ids=["bf16", "fp8_e4m3", "fp16"])
@settings(max_examples=3, deadline=None)
@given(mant=st.integers(0, 2**23 - 1), e=st.integers(-3, 3), neg=st.booleans())
def test_stochastic_probability_is_exact_fractional_distance(fmt, dtype, mant, e, neg):
    """Over all 2**n bit patterns, P(round away) = (|x| - lo) / ulp exactly (default sr_bits,
    normal range: the bits x loses are exactly the n random bits)."""
    f = parse(fmt)
    n = default_sr_bits(f, dtype)
    e = min(max(e, f.emin), f.emax - 1)  # normal range
    x = torch.tensor([(-1) ** neg * (1 + mant / 2**23) * 2.0**e], dtype=dtype)
    chunk = 2**18  # stay on the eager reference backend (the fused one starts at 2**20 elements)
    q = torch.cat([mpcompile.quantize(x.expand(min(chunk, 2**n)), f, "stochastic", random_bits=bits)
                   for bits in torch.arange(2**n).split(chunk)])
    lo, hi = mpcompile.quantize(x, f, "toward_zero").item(), _away(x, f).item()
    assert set(q.unique().tolist()) <= {lo, hi}
    away = int((q == hi).sum()) if hi != lo else 0
    frac = (Fraction(x.item()) - Fraction(lo)) / (Fraction(hi) - Fraction(lo)) if hi != lo else Fraction(0)
    assert Fraction(away, 2**n) == frac


@pytest.mark.parametrize("sr_bits", [1, 2, 4])
def test_stochastic_few_bits_rounds_distance_to_even(sr_bits):
    """With n random bits the distance is first rounded to n bits (ties to even, as gfloat)."""
    ulp = 2.0**-3  # fp8_e4m3 in [1, 2)
    fracs = np.arange(64) / 64
    x = torch.tensor(1.0 + fracs * ulp, dtype=torch.float64)
    count = sum(mpcompile.quantize(x, "fp8_e4m3", "stochastic", sr_bits=sr_bits,
                                   random_bits=torch.full(x.shape, b, dtype=torch.int64)) > x for b in range(2**sr_bits))
    want = np.round(fracs * 2**sr_bits)  # numpy rounds half to even
    assert np.array_equal(count.numpy(), want)
