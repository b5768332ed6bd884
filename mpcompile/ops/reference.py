"""A scalar reference for emulated dot products, in exact rational arithmetic.

``dot`` states, literally, what one output element ``sum_k a[k] * b[k]`` of an emulated op
is under an ``ArithSpec``. Every intermediate value is held exactly (``fractions.Fraction``)
and every rounding is ``round_rational`` of that exact value, which has ``quantize``'s
semantics. It is slow on purpose; vectorised code is tested against it bit for bit.

- products: ``p_k`` = the exact ``a_k * b_k`` rounded to ``spec.mul`` by ``spec.mul_rounding``
  (kept exact when ``spec.mul`` is None);
- ``sequential``: ``acc = round(acc + p_k)`` for k = 0, 1, ..., from acc = +0;
- ``chunk(c)``: the same with the exact sum of each run of c products as the term
  (``sequential`` is ``chunk(1)``);
- ``pairwise``: neighbours are added, each add rounded, level by level; an odd last value is
  carried up unrounded;
- ``kahan``: compensated summation of those terms, every operation rounded to acc.

Zeros and specials follow IEEE 754: a product's sign is the xor of the signs, an exact sum
that is zero is +0 unless both addends are -0 (in every rounding mode), ``0 * inf`` and
``inf - inf`` are NaN. Stochastic rounding ``step`` of ``stream`` for output ``element`` uses
the word ``counter_word(element, stream_seed(seed, stream, step))``.
"""
from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Callable, Sequence, Union

from ..formats import FloatFormat
from ..random_bits import counter_word, stream_seed
from ..rounding import ROUNDING_MODES
from .spec import STREAM_ADD, STREAM_KAHAN, STREAM_MUL, ArithSpec

__all__ = ["round_rational", "dot"]

STREAM_KAHAN_Y, STREAM_KAHAN_T, STREAM_KAHAN_Z, STREAM_KAHAN_C = STREAM_KAHAN

Num = Union[Fraction, float]
"""An exact value: a Fraction when finite and nonzero, else a float (+-0, +-inf, NaN)."""
RoundAcc = Callable[[Num, int, int], Num]  # (exact value, stream, step) -> rounded to acc


def round_rational(v: "Fraction | float", negative: bool, fmt: FloatFormat, mode: str,
                   bits: int = 0, n: int = 0) -> float:
    """The value of ``fmt`` that the exact ``v`` rounds to: ``quantize`` without saturation.

    Args:
        v: the exact value, a Fraction or a float (+-inf and NaN included).
        negative: the sign: ``v < 0``, or for ``v == 0`` which zero it is (True: -0).
        fmt: the format rounded to.
        mode: one of ``ROUNDING_MODES``.
        bits: ``stochastic``: the random word; its low ``n`` bits are used.
        n: ``stochastic``: the number of random bits, 1..62.

    Returns:
        A value of ``fmt`` as a float, or +-inf, or NaN.
    """
    if mode not in ROUNDING_MODES:
        raise ValueError(f"round_rational: mode={mode!r} is not one of {', '.join(ROUNDING_MODES)}")
    if mode == "stochastic" and not 1 <= n <= 62:
        raise ValueError(f"round_rational: stochastic rounding needs 1 <= n <= 62 random bits, got n={n}")
    sign = -1.0 if negative else 1.0
    if v != v:
        return math.copysign(math.nan, sign)
    if v != 0 and (v < 0) != negative:
        raise ValueError(f"round_rational: v={v} disagrees with negative={negative}")
    a = math.inf if isinstance(v, float) and math.isinf(v) else abs(Fraction(v))
    r = math.inf if a == math.inf else _round_magnitude(a, negative, fmt, mode, bits, n)
    # an unsigned format's only non-positive value is 0: negative v is out of range unless its
    # magnitude rounds to 0; in a format without zero (E8M0) every negative v is
    out = not fmt.signed and negative and (r != 0 if fmt.has_zero else a > 0)
    if r > fmt.max:  # overflow; the directed modes keep a finite value finite on their side
        clamp = mode in ("toward_zero", "odd") or (mode == "up" and negative) or (mode == "down" and not negative)
        r = Fraction(fmt.max) if clamp and a != math.inf else (math.inf if fmt.inf else math.nan)
    if not fmt.has_zero:  # E8M0: zero is not a value, nothing rounds below the smallest one
        if a == 0:
            r = math.nan
        elif r < fmt.min_subnormal:
            r = Fraction(fmt.min_subnormal)
    if not fmt.signed:  # a negative value rounding to 0 gives +0 (r is a magnitude)
        return math.nan if out else float(r)
    if r == 0 and not fmt.neg_zero:
        return 0.0
    return math.copysign(float(r), sign)


def _round_magnitude(a: Fraction, negative: bool, fmt: FloatFormat, mode: str, bits: int, n: int) -> Fraction:
    """Round ``a >= 0`` to a multiple of the quantum ``2**qe`` of ``fmt`` there (no overflow check)."""
    qe = _quantum_exponent(a, fmt)
    quantum = Fraction(2) ** qe
    fl = math.floor(a / quantum)
    delta = a / quantum - fl  # in [0, 1): how far a is from fl * quantum, in quanta
    if fmt.man == 0:  # one value per binade: a code's parity is its exponent's (as gfloat)
        odd = fl != 0 and (qe + fmt.bias) % 2 == 1
    else:
        odd = fl % 2 == 1
    half = Fraction(1, 2)
    if mode == "nearest":
        away = delta > half or (delta == half and odd)
    elif mode == "nearest_away":
        away = delta >= half
    elif mode == "toward_zero":
        away = False
    elif mode == "up":
        away = delta != 0 and not negative
    elif mode == "down":
        away = delta != 0 and negative
    elif mode == "odd":
        away = delta != 0 and not odd
    else:  # stochastic, as gfloat: delta rounded to n bits (ties to even), then compared
        away = round(delta * 2**n) + (bits & (2**n - 1)) >= 2**n
    return (fl + away) * quantum


def _quantum_exponent(a: Fraction, fmt: FloatFormat) -> int:
    """qe: the spacing of ``fmt``'s values at ``a`` is ``2**qe`` (any qe will do for a == 0)."""
    e = _floor_log2(a) if a > 0 else fmt.emin
    if not fmt.subnormals and fmt.man > 0 and e < fmt.emin:  # flush to zero: 0 and min_normal
        return fmt.emin
    return max(e, fmt.emin) - fmt.man


def _floor_log2(a: Fraction) -> int:
    """floor(log2(a)) for a > 0, exactly."""
    e = a.numerator.bit_length() - a.denominator.bit_length()  # floor(log2(a)) is e or e - 1
    return e if a >= Fraction(2) ** e else e - 1


# -- exact arithmetic with IEEE zeros and specials ------------------------------------------
def _num(x: float) -> Num:
    return Fraction(x) if math.isfinite(x) and x != 0 else x


def _mul(x: Num, y: Num) -> Num:
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        return x * y
    return _stand_in(x) * _stand_in(y)  # a zero or special: IEEE decides


def _stand_in(x: Num) -> float:
    """x if a float, else +-1.0: a nonzero finite value of x's sign (all IEEE's rules look at)."""
    return x if isinstance(x, float) else (1.0 if x > 0 else -1.0)


def _add(x: Num, y: Num) -> Num:
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        return x + y if x != -y else 0.0  # exact cancellation: +0
    if isinstance(x, float) and isinstance(y, float):
        return x + y  # zeros and specials: exact in float, with IEEE's signs
    special, finite = (x, y) if isinstance(x, float) else (y, x)
    return finite if special == 0 else special


def _round(x: Num, fmt: FloatFormat, mode: str, bits: int, n: int) -> Num:
    negative = x < 0 if isinstance(x, Fraction) else math.copysign(1.0, x) < 0
    return _num(round_rational(x, negative, fmt, mode, bits, n))


# -- the orders -------------------------------------------------------------------------------
def _running(terms: Sequence[Num], to_acc: RoundAcc) -> Num:
    acc: Num = 0.0
    for k, term in enumerate(terms):
        acc = to_acc(_add(acc, term), STREAM_ADD, k)
    return acc


def _kahan(terms: Sequence[Num], to_acc: RoundAcc) -> Num:
    acc: Num = 0.0
    c: Num = 0.0
    for k, term in enumerate(terms):
        y = to_acc(_add(term, -c), STREAM_KAHAN_Y, k)
        t = to_acc(_add(acc, y), STREAM_KAHAN_T, k)
        z = to_acc(_add(t, -acc), STREAM_KAHAN_Z, k)
        c = to_acc(_add(z, -y), STREAM_KAHAN_C, k)
        acc = t
    return acc


def _pairwise(values: Sequence[Num], to_acc: RoundAcc) -> Num:
    count = len(values)
    if count <= 1:  # no product: +0; one: round(+0 + p0)
        return to_acc(_add(0.0, values[0]), STREAM_ADD, 0) if values else 0.0
    level = 0
    while len(values) > 1:
        sums = [to_acc(_add(values[2 * j], values[2 * j + 1]), STREAM_ADD, count * level + j)
                for j in range(len(values) // 2)]
        values = sums + list(values[2 * len(sums):])  # an odd last value goes up unrounded
        level += 1
    return values[0]


def dot(a: Sequence[float], b: Sequence[float], spec: ArithSpec, *, seed: int = 0, element: int = 0) -> float:
    """One output element ``sum_k a[k] * b[k]`` computed as ``spec`` says (see the module docstring).

    Args:
        a, b: the factors, of equal length.
        spec: the arithmetic: product and accumulator formats, roundings, order, kahan.
            ``fma`` needs no case of its own: it implies ``mul=None``.
        seed: the seed of the random bits of stochastic rounding.
        element: the index of this output element (the counter of the random words).

    Returns:
        The accumulator's final value as a float.
    """
    if len(a) != len(b):
        raise ValueError(f"dot: a has {len(a)} entries, b has {len(b)}")

    def rounded(x: Num, fmt: FloatFormat, mode: str, stream: int, step: int) -> Num:
        bits = counter_word(element, stream_seed(seed, stream, step))
        return _round(x, fmt, mode, bits, spec.sr_bits_for(fmt))

    def to_acc(x: Num, stream: int, step: int) -> Num:
        return rounded(x, spec.acc, spec.rounding, stream, step)

    products = [_mul(_num(float(x)), _num(float(y))) for x, y in zip(a, b)]
    if spec.mul is not None:
        products = [rounded(p, spec.mul, spec.mul_rounding, STREAM_MUL, k) for k, p in enumerate(products)]
    if spec.order == "pairwise":
        return float(_pairwise(products, to_acc))
    c = spec.chunk or 1
    terms = [functools.reduce(_add, products[i:i + c]) for i in range(0, len(products), c)]
    return float(_kahan(terms, to_acc) if spec.kahan else _running(terms, to_acc))
