"""The scalar reference ``mpcompile.ops.reference``: ``round_rational`` against ``quantize``
bit for bit and on exact values float64 cannot hold (by hand), and ``dot`` on hand-checked
cases of every order, product rounding, Kahan, zero signs, random-bit streams and the
issue's checks (4096 ones in an e5m10 accumulator).
"""
from __future__ import annotations

import math
import random
import statistics
import struct
from fractions import Fraction

import pytest
import torch

from mpcompile.formats import parse
from mpcompile.ops.reference import (STREAM_ADD, STREAM_KAHAN_T, STREAM_MUL, dot, round_rational)
from mpcompile.ops.spec import ArithSpec
from mpcompile.random_bits import counter_word, stream_seed
from mpcompile.rounding import ROUNDING_MODES, quantize

FORMATS = ["fp8_e5m2", "fp8_e4m3", "e5m10", "bf16", "fp8_e4m3fnuz", "fp4_e2m1", "e5m2(subnormals=false)",
           "p3109(8,3)", "e4m0", "e3m0(subnormals=false)", "e8m0", "e5m2(signed=false)"]
MODES = [(m, 0) for m in ROUNDING_MODES if m != "stochastic"] + [("stochastic", 3), ("stochastic", 32)]


def _bits(x: float) -> int | str:
    """The float64 bit pattern; every NaN is the same."""
    return "nan" if math.isnan(x) else struct.unpack("<q", struct.pack("<d", x))[0]


def _values(fmt, rng: random.Random) -> list[float]:
    """Values of fmt, midpoints of neighbours and points next to and between them, zeros,
    overflow, infinities, NaN and values far below the smallest one, of both signs."""
    grid = sorted({abs(v) for v in fmt.values().tolist()})
    step = math.ldexp(1.0, fmt.emax - fmt.man)
    grid.append(fmt.max + step)  # the first value past max: its midpoint is the overflow tie
    pairs = list(zip(grid, grid[1:]))
    if len(pairs) > 300:  # 16-bit formats: both ends and a sample of the middle
        pairs = pairs[:40] + rng.sample(pairs[40:-40], 220) + pairs[-40:]
    out = []
    for lo, hi in pairs:
        mid = (lo + hi) / 2
        out += [lo, mid, math.nextafter(mid, 0), math.nextafter(mid, math.inf), lo + (hi - lo) * rng.random()]
        out += [lo + (hi - lo) / 16, lo + (hi - lo) * 5 / 16]  # ties of stochastic rounding's 3-bit delta
    tiny = fmt.min_subnormal
    out += [0.0, 5e-324, 1e-300, tiny / 2, tiny / 4, tiny * 0.75, fmt.max * 2, 1e300, math.inf, math.nan]
    return out + [-v for v in out]


@pytest.mark.parametrize("mode,n", MODES)
@pytest.mark.parametrize("spec", FORMATS)
def test_round_rational_matches_quantize(spec, mode, n):
    fmt = parse(spec)
    rng = random.Random(f"{spec}/{mode}")
    xs = _values(fmt, rng)
    kwargs, words = {}, [0] * len(xs)
    if mode == "stochastic":
        words = [rng.getrandbits(n) for _ in xs]
        kwargs = dict(sr_bits=n, random_bits=torch.tensor(words, dtype=torch.int64))
    want = quantize(torch.tensor(xs, dtype=torch.float64), fmt, mode, **kwargs).tolist()
    got = [round_rational(Fraction(x) if math.isfinite(x) else x, math.copysign(1.0, x) < 0, fmt, mode, w, n)
           for x, w in zip(xs, words)]
    bad = [(x, g, w) for x, g, w in zip(xs, got, want) if _bits(g) != _bits(w)]
    assert not bad, f"{len(bad)} of {len(xs)} differ (x, reference, quantize): {bad[:5]}"


E5M2 = parse("fp8_e5m2")  # values 1, 1.25, 1.5, 1.75, 2, 2.5 ...
TINY = Fraction(1, 2**70)


@pytest.mark.parametrize("v,mode,want", [
    # 1 + 2**-80: just above 1 (the quantum at 1 is 1/4; 1 = 4 quanta is even)
    (1 + Fraction(1, 2**80), "nearest", 1.0), (1 + Fraction(1, 2**80), "nearest_away", 1.0),
    (1 + Fraction(1, 2**80), "toward_zero", 1.0), (1 + Fraction(1, 2**80), "up", 1.25),
    (1 + Fraction(1, 2**80), "down", 1.0), (1 + Fraction(1, 2**80), "odd", 1.25),
    (-1 - Fraction(1, 2**80), "up", -1.0), (-1 - Fraction(1, 2**80), "down", -1.25),
    (-1 - Fraction(1, 2**80), "odd", -1.25), (-1 - Fraction(1, 2**80), "toward_zero", -1.0),
    # the midpoint 1.125 of 1 and 1.25, and either side of it by 2**-70
    (Fraction(9, 8), "nearest", 1.0), (Fraction(9, 8) + TINY, "nearest", 1.25),
    (Fraction(9, 8) - TINY, "nearest", 1.0), (Fraction(9, 8), "nearest_away", 1.25),
    (Fraction(9, 8) - TINY, "nearest_away", 1.0), (Fraction(11, 8), "nearest", 1.5),
    (Fraction(11, 8) - TINY, "nearest", 1.25), (Fraction(11, 8) + TINY, "odd", 1.25),
    (Fraction(3, 2) + TINY, "odd", 1.75), (Fraction(3, 2) - TINY, "odd", 1.25),
    (Fraction(3, 2) - TINY, "up", 1.5), (Fraction(3, 2) - TINY, "down", 1.25),
    # overflow: max = 57344 = 1.75 * 2**15, next would be 2**16; the tie 61440 goes to even 2**16
    (Fraction(61440) - TINY, "nearest", 57344.0), (Fraction(61440), "nearest", math.inf),
    (Fraction(10**30) + TINY, "toward_zero", 57344.0), (-Fraction(10**30) - TINY, "up", -57344.0),
    # far below the smallest subnormal 2**-16
    (TINY, "nearest", 0.0), (TINY, "up", 2.0**-16), (-TINY, "nearest", -0.0), (-TINY, "odd", -(2.0**-16)),
])
def test_round_rational_exact_values(v, mode, want):
    assert _bits(round_rational(v, v < 0, E5M2, mode)) == _bits(want)


def test_round_rational_exact_values_e5m10():
    e5m10 = parse("e5m10")  # the quantum on [2048, 4096) is 2
    assert round_rational(Fraction(2049) + Fraction(1, 2**60), False, e5m10, "nearest") == 2050.0
    assert round_rational(Fraction(2049), False, e5m10, "nearest") == 2048.0
    assert round_rational(Fraction(2051) - Fraction(1, 2**60), False, e5m10, "nearest") == 2050.0


@pytest.mark.parametrize("v,n,bits,want", [
    # delta = 1/2 + 2**-68 quanta: rounded to 8 bits it is 128/256, so away iff bits >= 128
    (Fraction(9, 8) + TINY, 8, 127, 1.0), (Fraction(9, 8) + TINY, 8, 128, 1.25),
    # delta = 1/4 + 2**-68: 1 bit holds 0.5 + 2**-67 -> 1 (up), so away iff the bit is 1
    (Fraction(17, 16) + TINY, 1, 0, 1.0), (Fraction(17, 16) + TINY, 1, 1, 1.25),
    # delta = 1/4 exactly: 0.5 ties to even 0, never away; only the low n bits count
    (Fraction(17, 16), 1, 1, 1.0), (Fraction(9, 8) + TINY, 8, 0xFFFFFF00, 1.0),
])
def test_round_rational_stochastic_exact(v, n, bits, want):
    assert round_rational(v, False, E5M2, "stochastic", bits, n) == want


def test_round_rational_rejects_bad_arguments():
    with pytest.raises(ValueError):
        round_rational(Fraction(1), True, E5M2, "nearest")
    with pytest.raises(ValueError):
        round_rational(Fraction(1), False, E5M2, "sideways")
    with pytest.raises(ValueError):
        round_rational(Fraction(1), False, E5M2, "stochastic", 0, 0)


# -- dot -------------------------------------------------------------------------------------
ONES = [1.0] * 4096


def test_issue_4096_ones():
    # e5m10 holds every integer up to 2048; above it the spacing is 2, 2048 + 1 ties to even 2048
    assert dot(ONES, ONES, ArithSpec(acc="e5m10")) == 2048.0
    assert dot(ONES, ONES, ArithSpec(acc="e5m10", kahan=True)) == 4096.0
    assert dot(ONES, ONES, ArithSpec(acc="e5m10", order="pairwise")) == 4096.0  # partial sums 2**l


def test_issue_4096_ones_stochastic_is_unbiased():
    # Each rounding is unbiased (delta is 1/2, 1/4 or 3/4 of a quantum u, exact in 32 bits),
    # so E[sum] = 4096. The first 2048 adds are exact; each of the others has variance
    # delta * (1 - delta) * u**2 <= u**2 / 4 <= 4 while acc < 8192 (u <= 4), so one run has
    # Var <= 2048 * 4 = 8192, and the mean of 20 independent seeds has SD <= sqrt(8192 / 20)
    # ~ 20.2. We allow 5 SD (101); round-to-nearest's 2048 is 100 SD away.
    spec = ArithSpec(acc="e5m10", rounding="stochastic")
    sums = [dot(ONES, ONES, spec, seed=seed) for seed in range(20)]
    assert abs(statistics.mean(sums) - 4096) <= 101
    assert len(set(sums)) > 1 and all(s % 2 == 0 for s in sums)


TERMS = [2048.0, 1.0, 1.0, 1.0, 1.0]  # exact sum 2052; e5m10 spacing is 2 on [2048, 4096)


@pytest.mark.parametrize("order,kahan,want", [
    ("sequential", False, 2048.0),  # 2048 + 1 ties to 2048 four times
    ("chunk(2)", False, 2052.0),  # 2049 -> 2048; + 2 = 2050; + 1 = 2051 ties to even 2052
    ("chunk(3)", False, 2052.0),  # 2050; + 2
    ("chunk(4)", False, 2052.0),  # 2051 -> 2052; + 1 = 2053 ties to even 2052
    ("pairwise", False, 2052.0),  # (2048+1 -> 2048, 1+1, 1 up) -> (2050, 1 up) -> 2051 -> 2052
    ("sequential", True, 2052.0),  # kahan: c = -1 after the first 1 carries it to the next add
    ("chunk(2)", True, 2052.0),
])
def test_dot_orders_by_hand(order, kahan, want):
    assert dot(TERMS, [1.0] * 5, ArithSpec(acc="e5m10", order=order, kahan=kahan)) == want


def test_kahan_by_hand():
    spec = ArithSpec(acc="e5m10", kahan=True)
    # term 1: t = 2049 -> 2048, z = 0, c = -1; term 2: y = 1 - (-1) = 2, t = 2050
    assert dot([2048.0, 1.0, 1.0], [1.0] * 3, spec) == 2050.0
    assert dot([2048.0, 1.0, 1.0], [1.0] * 3, ArithSpec(acc="e5m10")) == 2048.0


def test_pairwise_carries_a_leaf_unrounded():
    # x = 1 + 3*2**-10 - 2**-20; 2 + x = 3 + 1.5*2**-9 - 2**-20 rounds (quantum 2**-9) to 3 + 2**-9.
    # Rounding x first (to 1 + 3*2**-10) would make 2 + x a tie, going to even 3 + 2**-8.
    x = 1 + 3 * 2.0**-10 - 2.0**-20
    assert dot([1.0, 1.0, x], [1.0] * 3, ArithSpec(acc="e5m10", order="pairwise")) == 3 + 2.0**-9


@pytest.mark.parametrize("order", ["sequential", "pairwise", "chunk(3)"])
def test_dot_empty_and_single(order):
    spec = ArithSpec(acc="fp8_e5m2", order=order)
    assert _bits(dot([], [], spec)) == _bits(0.0)
    assert dot([1.1], [1.0], spec) == 1.0  # round(+0 + 1.1)
    assert _bits(dot([-0.0], [1.0], spec)) == _bits(0.0)  # +0 + -0 = +0


@pytest.mark.parametrize("rounding,want", [("nearest", 1.5), ("up", 1.75), ("toward_zero", 1.5)])
def test_mul_rounding_by_hand(rounding, want):
    # 1.25 * 1.25 = 1.5625 = 6.25 quanta of 1/4: nearest and toward_zero 1.5, up 1.75
    spec = ArithSpec(mul="fp8_e5m2", acc="fp32", mul_rounding=rounding)
    assert dot([1.25], [1.25], spec) == want
    assert dot([1.25, 1.25], [1.25, 1.25], spec) == 2 * want


def test_mul_rounding_tie_and_overflow():
    spec = ArithSpec(mul="fp8_e5m2", acc="fp32")
    assert dot([1.5], [1.5], spec) == 2.0  # 2.25: quantum 1/2 on [2, 4) -> 4.5 quanta, ties to even 2
    assert dot([1.5, 1.5], [1.5, -1.5], spec) == 0.0  # 2 + (-2) = +0
    assert dot([300.0], [300.0], spec) == math.inf  # 90000 > max 57344
    assert dot([300.0], [300.0], ArithSpec(mul="fp8_e5m2", acc="fp32", rounding="toward_zero")) == 57344.0
    assert math.isnan(dot([math.inf], [0.0], spec))


def test_zero_signs():
    spec = ArithSpec(acc="e5m10")
    assert _bits(dot([-1e-30, -0.0], [1.0, 1.0], spec)) == _bits(-0.0)  # round(-1e-30) = -0; -0 + -0
    assert _bits(dot([-1e-30, 0.0], [1.0, 1.0], spec)) == _bits(0.0)  # -0 + +0 = +0
    assert _bits(dot([-1e-30, 1e-30], [1.0, -1.0], spec)) == _bits(-0.0)  # products -1e-30 twice
    assert _bits(dot([-1e-30], [1.0], ArithSpec(acc="fp8_e4m3fnuz"))) == _bits(0.0)  # no -0
    chunk2 = ArithSpec(acc="e5m10", order="chunk(2)")  # acc = -0 after the first chunk
    assert _bits(dot([-1e-30, -0.0, -0.0, -0.0], [1.0] * 4, chunk2)) == _bits(-0.0)  # -0 + (-0 + -0)
    assert _bits(dot([-1e-30, -0.0, 1.0, -1.0], [1.0] * 4, chunk2)) == _bits(0.0)  # -0 + (1 - 1 = +0)


@pytest.mark.parametrize("spec_kw", [
    dict(acc="e5m10"), dict(mul="fp8_e5m2", acc="bf16", rounding="stochastic"),
    dict(acc="fp8_e4m3", rounding="odd"), dict(acc="e5m10", rounding="stochastic", kahan=True),
])
def test_chunk1_is_sequential(spec_kw):
    rng = random.Random(1)
    a = [rng.uniform(-4, 4) for _ in range(40)]
    b = [rng.uniform(-4, 4) for _ in range(40)]
    for seed in range(3):
        seq = dot(a, b, ArithSpec(order="sequential", **spec_kw), seed=seed, element=seed)
        one = dot(a, b, ArithSpec(order="chunk(1)", **spec_kw), seed=seed, element=seed)
        assert _bits(seq) == _bits(one)


def _word(seed: int, element: int, stream: int, step: int) -> int:
    return counter_word(element, stream_seed(seed, stream, step))  # 32 bits = sr_bits here


@pytest.mark.parametrize("seed,element", [(s, e) for s in range(4) for e in (0, 7)])
def test_random_bit_streams(seed, element):
    half, quarter3 = 2**31, 3 * 2**30
    # products (stream 0, step k): 1.25 * 1.25 = 6.25 quanta: away iff the word >= 3/4 of 2**32
    spec = ArithSpec(mul="fp8_e5m2", acc="fp32", mul_rounding="stochastic")
    p1 = 1.75 if _word(seed, element, STREAM_MUL, 1) >= quarter3 else 1.5
    assert dot([1.0, 1.25], [1.0, 1.25], spec, seed=seed, element=element) == 1.0 + p1
    # sequential adds (stream 1, step k): 2048 + 1 is a tie
    spec = ArithSpec(acc="e5m10", rounding="stochastic")
    up = _word(seed, element, STREAM_ADD, 1) >= half
    assert dot([2048.0, 1.0], [1.0, 1.0], spec, seed=seed, element=element) == (2050.0 if up else 2048.0)
    # pairwise (stream 1, step K*level + node): level 0 node 0 is step 0, level 1 node 0 is step 3
    s = 2050.0 if _word(seed, element, STREAM_ADD, 0) >= half else 2048.0
    s += 2.0 if _word(seed, element, STREAM_ADD, 3) >= half else 0.0
    assert dot([2048.0, 1.0, 1.0], [1.0] * 3, ArithSpec(acc="e5m10", order="pairwise", rounding="stochastic"),
               seed=seed, element=element) == s
    # chunk(2) (stream 1, step = chunk index): chunk 1 adds 2 + 1 exactly to 2048 -> 2051, a tie
    s = 2052.0 if _word(seed, element, STREAM_ADD, 1) >= half else 2050.0
    assert dot([1024.0, 1024.0, 2.0, 1.0], [1.0] * 4, ArithSpec(acc="e5m10", order="chunk(2)",
               rounding="stochastic"), seed=seed, element=element) == s
    # kahan: t of term k is stream 2, step k (y, z, c are exact here)
    spec = ArithSpec(acc="e5m10", rounding="stochastic", kahan=True)
    up = _word(seed, element, STREAM_KAHAN_T, 1) >= half
    assert dot([2048.0, 1.0], [1.0, 1.0], spec, seed=seed, element=element) == (2050.0 if up else 2048.0)
