"""Rounding float32 values to a number format inside a Triton kernel, bit for bit as ``quantize``.

``round_to_format`` takes a tile of float32 values in registers and returns it rounded to the
format that a ``RoundSpec`` (``round_spec``) describes; ``round_blocks`` does the same for block-scaled formats,
one block per row, and ``round_float64`` for float64 values (an emulated GEMM's exact sums)
and formats whose values float32 holds. A spec is one ``tl.constexpr`` (a NamedTuple of Python
values), so every format, rounding mode and saturation flag gets its own specialised code with
all constants folded, and a kernel that rounds in several formats (a GEMM's inputs, products
and accumulator) takes one spec per role and calls the same functions.

Everything is integer arithmetic on the float32 bit pattern. ``|x| = m * 2**(E' - 150)``
with ``m`` a 24-bit integer and ``E' = max(E, 1)``, so rounding ``|x|`` to a multiple of the
quantum ``2**qe`` splits ``m`` at bit ``s = qe - (E' - 150)``, and the rounded magnitude is the
bit pattern with its low ``s`` bits cleared plus ``away << s``: a carry out of the significand
field runs into the exponent field exactly as the value carries into the next binade. No
fp32->bf16/fp8 cast is used (the interpreter does not round those correctly) and no float
operation that could round or flush a subnormal, except scaling a block's largest value,
which repeats the reference's own two multiplications. ``round_float64`` does the same on the
float64 pattern (a 53-bit ``m``); its one cast, to float32, is of a value float32 holds. A
NaN result is torch.nan with the sign the reference gives it (the reference's payload depends
on which torch kernel made the NaN).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..formats.block_format import SCALE_EXP_MAX, SCALE_EXP_MIN
from ..random_bits import INDEX_FOLD, MASK32, MIX_MUL1, MIX_MUL2

__all__ = ["round_to_format", "round_float64", "round_blocks", "block_scale_exp",
           "counter_word", "stream_seed"]

_ABS = tl.constexpr(0x7FFFFFFF)
_SIGN = tl.constexpr(-(2**31))  # the sign bit, as an int32
_INF = tl.constexpr(0x7F800000)
_NAN = tl.constexpr(0x7FC00000)  # torch.nan
_SCALE_MIN = tl.constexpr(SCALE_EXP_MIN)
_SCALE_MAX = tl.constexpr(SCALE_EXP_MAX)
_MIX1 = tl.constexpr(MIX_MUL1)
_MIX2 = tl.constexpr(MIX_MUL2 % 2**32)  # random_bits keeps it as a negative int64
_FOLD = tl.constexpr(INDEX_FOLD)
_LOW32 = tl.constexpr(MASK32)
_ABS64 = tl.constexpr(2**63 - 1)
_INF64 = tl.constexpr(0x7FF0000000000000)
_FRAC64 = tl.constexpr(2**52 - 1)


# -- random bits ------------------------------------------------------------------------------
@triton.jit
def _mix32(v):
    """lowbias32 on uint32 words (multiplication wraps mod 2**32)."""
    v = v ^ (v >> 16)
    v = v * _MIX1
    v = v ^ (v >> 15)
    v = v * _MIX2
    return v ^ (v >> 16)


@triton.jit
def counter_word(index, seed):
    """``random_bits.counter_words``: the uint32 word of int64 flat indices ``index`` for a uint32 seed."""
    low = ((index ^ ((index >> 32) * _FOLD)) & _LOW32).to(tl.uint32)
    return _mix32(_mix32(low) ^ seed)


@triton.jit
def stream_seed(seed, STREAM: tl.constexpr, step):
    """``random_bits.stream_seed``: the uint32 seed of rounding ``step`` (an integer) of stream
    ``STREAM`` of an emulated reduction, from the reduction's uint32 seed."""
    return _mix32(seed ^ _mix32(tl.cast(step, tl.uint32) * 8 + STREAM))


# -- rounding -----------------------------------------------------------------------------------
@triton.jit
def _exponent(ua):
    """floor(log2(a)) from the bits of a positive finite float32 a; a subnormal's exactly
    (its integer significand converts to float32 exactly)."""
    sub = (ua.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127 - 149
    return tl.where(ua >= 0x800000, (ua >> 23) - 127, sub)


@triton.jit
def _pow2(k):
    """2**k as float32, for integer k in the normal range [-126, 127]."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_bits(bits, k):
    """The float32 of ``bits`` (positive, finite) times 2**k, computed as the reference does: two
    steps of 2**(k/2). A result past float32's range is inf without a float overflow (which the
    interpreter reports as a warning)."""
    over = _exponent(bits) + k > 127
    k = tl.where(over, 0, k)
    h = k >> 1
    v = (bits.to(tl.float32, bitcast=True) * _pow2(h) * _pow2(k - h)).to(tl.int32, bitcast=True)
    return tl.where(over, _INF, v)


@triton.jit
def _away(fl, rem, half, s, qe, neg, rbits, scale_exp, SPEC: tl.constexpr, M: tl.constexpr):
    """Whether |x| = (fl + rem / 2**s) * 2**qe rounds away from zero to (fl + 1) * 2**qe, for
    significands of M bits.

    ``half`` is 2**(s-1) (s clamped to M + 1, where rem < half already); rem is 0 where s <= 0.
    """
    inexact = rem != 0
    if SPEC.parity_by_exponent:  # man == 0: a code's parity is its exponent field's (as gfloat)
        bias = SPEC.bias if scale_exp is None else SPEC.bias - scale_exp
        odd = (fl != 0) & (((qe + bias) & 1) == 1)
    else:
        odd = (fl & 1) == 1
    if SPEC.rounding == "nearest":
        away = (rem > half) | ((rem == half) & odd)
    elif SPEC.rounding == "nearest_away":
        away = rem >= half
    elif SPEC.rounding == "toward_zero":
        away = rem < 0  # never
    elif SPEC.rounding == "up":
        away = inexact & ~neg
    elif SPEC.rounding == "down":
        away = inexact & neg
    elif SPEC.rounding == "odd":
        away = inexact & ~odd
    else:
        tl.static_assert(SPEC.rounding == "stochastic", "unknown rounding mode")
        away = _stochastic_away(rem, s, rbits, SPEC.sr_bits, M)
    return away


@triton.jit
def _stochastic_away(rem, s, rbits, N: tl.constexpr, M: tl.constexpr):
    """gfloat's stochastic rule: the fraction rem / 2**s (rem < 2**M) rounded to N bits (ties
    to even), plus the low N random bits, reaches 2**N. The sum is below 2**(N+1): int32 for a
    24-bit significand up to N = 30, else int64 (N <= 62)."""
    if N <= 30 and M == 24:
        r = rem
        one = tl.full(r.shape, 1, tl.int32)
        up_max: tl.constexpr = 30
    else:
        r = rem.to(tl.int64)
        one = tl.full(r.shape, 1, tl.int64)
        up_max: tl.constexpr = 62
    k = s - N  # d = rem * 2**-k, rounded
    kc = tl.minimum(tl.maximum(k, 1), M + 1)  # rem < 2**M, half of 2**(M+1): from there on, d is 0
    q = r >> kc
    low = r & ((one << kc) - 1)
    h = one << (kc - 1)
    d_down = q + ((low > h) | ((low == h) & ((q & 1) == 1))).to(tl.int64)
    d_up = r << tl.minimum(tl.maximum(-k, 0), up_max)  # rem < 2**s: d_up < 2**N
    d = tl.where(k <= 0, d_up, d_down)
    two_n = one << N
    return (s > 0) & (d + (rbits.to(r.dtype) & (two_n - 1)) >= two_n)


@triton.jit
def round_to_format(x, rbits, scale_exp, SPEC: tl.constexpr):
    """``x`` rounded to the format of ``SPEC``, as ``rounding._round_values`` rounds it.

    Args:
        x: float32 tile.
        rbits: for stochastic rounding, integer random words broadcastable to x (the low
            ``SPEC.sr_bits`` bits are used); ignored otherwise (pass 0).
        scale_exp: None, or an int32 tile broadcastable to x: the format's values scaled by
            2**scale_exp (a block's shared scale).
        SPEC: the ``RoundSpec``.

    Returns:
        The rounded float32 tile.
    """
    ux = x.to(tl.int32, bitcast=True)
    neg = ux < 0
    ua = ux & _ABS
    finite = ua < _INF
    is_nan = ua > _INF
    if scale_exp is None:
        if SPEC.nearest_even:
            r = _nearest_even(ua, SPEC.emin, SPEC.man, SPEC.emin > -126)
        elif SPEC.stochastic_carry:
            r = _stochastic_carry(ua, rbits, SPEC)
        else:
            r = _round_magnitude(ua, neg, finite, is_nan, rbits, scale_exp, SPEC)
    elif SPEC.nearest_even:  # blocks: the short path where every block of the tile allows it
        emin = SPEC.emin + scale_exp
        if (tl.min(emin) - SPEC.man >= -125) & (tl.max(emin) - SPEC.man <= 104):
            r = _nearest_even(ua, emin, SPEC.man, True)
        else:
            r = _round_magnitude(ua, neg, finite, is_nan, rbits, scale_exp, SPEC)
    else:
        r = _round_magnitude(ua, neg, finite, is_nan, rbits, scale_exp, SPEC)
    r = tl.where(is_nan, _NAN, r)  # the short paths round NaN's bits like any others'
    return _finish(r, ux, ua, neg, finite, is_nan, scale_exp, SPEC)


@triton.jit
def _round_magnitude(ua, neg, finite, is_nan, rbits, scale_exp, SPEC: tl.constexpr):
    """round_to_format's general path: the rounded magnitude bits, before _finish."""
    big_e = ua >> 23
    m = tl.where(big_e > 0, (ua & 0x7FFFFF) | 0x800000, ua)
    unit = tl.maximum(big_e, 1) - 150  # |x| = m * 2**unit
    shift = 0 if scale_exp is None else scale_exp
    if SPEC.fixed:
        qe = tl.zeros_like(ua) + (shift - SPEC.man)
    else:
        e = _exponent(ua)
        emin = SPEC.emin + shift
        if SPEC.ftz:
            qe = tl.where(e < emin, emin, e - SPEC.man)
        else:
            qe = tl.maximum(e, emin) - SPEC.man
    # s <= 0: x is on the grid (this is also the reference's "never below the input's grid")
    s = qe - unit
    sc = tl.minimum(tl.maximum(s, 1), 25)  # m < 2**24: past 25 bits, nothing changes
    fl = m >> sc
    rem = tl.where(s > 0, m & ((1 << sc) - 1), 0)
    away = _away(fl, rem, 1 << (sc - 1), s, qe, neg, rbits, scale_exp, SPEC, 24)
    up = away.to(tl.int32)
    low_s = ((ua >> sc) + up) << sc  # s in [1, 23]: both ends of the interval share x's frame
    high_s = up * tl.where(qe > 127, _INF, (qe + 127) << 23)  # s >= 24: fl == 0, so 0 or 2**qe (qe >= -125)
    r = tl.where(s <= 0, ua, tl.where(s <= 23, low_s, high_s))
    return tl.where(finite, r, tl.where(is_nan, _NAN, _INF))


@triton.jit
def _nearest_even(ua, emin, MAN: tl.constexpr, SUB: tl.constexpr):
    """The magnitude bits ``ua`` (not NaN) rounded to nearest, ties to even, on the grid of a
    float format with MAN <= 22 fraction bits and least normal exponent ``emin`` (an integer,
    or a block's scaled one: a tile broadcastable to ua), as round_to_format's general path (a
    few operations instead of dozens). ``SUB``: round below 2**emin with the add-and-subtract
    constant, which needs emin - MAN >= -125 and <= 104; without it, emin must be -126.

    From 2**emin up (and below it too when emin == -126, where the format's subnormal quantum
    is the same number of float32 bit positions) the grid is float32's with the low 23 - man
    bits cleared: adding half an ulp minus one plus the kept lsb and masking rounds ties to
    even, a carry running into the exponent field as the value does into the next binade (inf
    stays inf). Below 2**emin the grid is uniform, q = 2**(emin - man): adding and subtracting
    C = 2**(emin - man + 23), whose ulp is q, rounds there with float32's own ties-to-even.
    With q >= 2**-125 every float32 subnormal is below q / 2, so a GPU that flushed subnormal
    operands would give the same result.
    """
    r = (ua + ((1 << (22 - MAN)) - 1) + ((ua >> (23 - MAN)) & 1)) & -(1 << (23 - MAN))
    if SUB:
        c = _pow2(tl.zeros_like(ua) + (emin - MAN + 23))
        small = ua < ((emin + 127) << 23)
        a = tl.where(small, ua, 0).to(tl.float32, bitcast=True)  # inf - inf would raise in the interpreter
        r = tl.where(small, ((a + c) - c).to(tl.int32, bitcast=True), r)
    return r


@triton.jit
def _stochastic_carry(ua, rbits, SPEC: tl.constexpr):
    """The magnitude bits ``ua`` (not NaN) rounded stochastically as round_to_format's general path
    rounds them, for float formats with man <= 22, emin == -126 or -104 <= emin <= 127, and
    N = 23 - man random bits (the default): a few operations instead of dozens.

    From 2**emin up (and below it too when emin == -126, where the format's subnormals drop the
    same N bits of float32's), a value drops exactly its low N bits, so the rule "the dropped
    fraction plus N random bits reaches 2**N" is the carry out of adding the random bits to
    them: add and mask (a carry runs into the exponent field as the value does into the next
    binade; inf's low bits are 0, so it stays inf). Below 2**emin > 2**-126 the grid is uniform,
    q = 2**(emin - man): t = a / q * 2**N is exact and below 2**23, so rint(t) (adding and
    subtracting 2**23) is the dropped fraction rounded to N bits, ties to even, as the general
    rule rounds it. (That a can be a float32 subnormal: Triton's code keeps them, no .ftz.)
    """
    N: tl.constexpr = 23 - SPEC.man
    rb = (rbits & ((1 << N) - 1)).to(tl.int32)
    r = (ua + rb) & -(1 << N)
    if SPEC.emin > -126:
        small = ua < ((SPEC.emin + 127) << 23)
        scale = _pow2(tl.zeros_like(ua) + (23 - SPEC.emin))
        t = tl.where(small, ua, 0).to(tl.float32, bitcast=True) * scale
        t = ((t + 8388608.0) - 8388608.0).to(tl.int32)  # rint(t): 2**23 has ulp 1
        q = _pow2(tl.zeros_like(ua) + (SPEC.emin - SPEC.man))
        r = tl.where(small, (((t + rb) >> N).to(tl.float32) * q).to(tl.int32, bitcast=True), r)
    return r


@triton.jit
def round_float64(x, rbits, SPEC: tl.constexpr):
    """float64 ``x`` rounded to the float format of ``SPEC``, returned as float32: as
    ``round_to_format`` rounds a value, for values with up to 53 significant bits (an emulated
    GEMM's exact sums, rounded to odd). The format's values must all be float32 values.

    Args:
        x: float64 tile, each value zero, normal, inf or NaN (no float64 subnormals).
        rbits: random words as for ``round_to_format`` (low ``SPEC.sr_bits`` used).
        SPEC: the ``RoundSpec`` of a float (not fixed-point) format.
    """
    tl.static_assert(not SPEC.fixed, "round_float64 rounds to float formats")
    ux = x.to(tl.int64, bitcast=True)
    neg = ux < 0
    ua = ux & _ABS64
    finite = ua < _INF64
    is_nan = ua > _INF64
    big_e = ua >> 52
    m = tl.where(big_e > 0, (ua & _FRAC64) | (_FRAC64 + 1), 0)
    unit = big_e - 1075  # |x| = m * 2**unit
    e = big_e - 1023
    if SPEC.ftz:
        qe = tl.where(e < SPEC.emin, SPEC.emin, e - SPEC.man)
    else:
        qe = tl.maximum(e, SPEC.emin) - SPEC.man
    s = qe - unit
    sc = tl.minimum(tl.maximum(s, 1), 54)  # m < 2**53: past 54 bits, nothing changes
    fl = m >> sc
    rem = tl.where(s > 0, m & ((1 << sc) - 1), 0)
    up = _away(fl, rem, 1 << (sc - 1), s, qe, neg, rbits, None, SPEC, 53).to(tl.int64)
    low_s = ((ua >> sc) + up) << sc  # s in [1, 52]: both ends of the interval share x's frame
    high_s = up * ((qe + 1023) << 52)  # s >= 53: fl == 0, so 0 or 2**qe
    r = tl.where(s <= 0, ua, tl.where(s <= 52, low_s, high_s)).to(tl.float64, bitcast=True)
    # to float32, exactly (the format's values are float32's); past the format's max, inf stands in
    # for the overflow _finish decides on
    amax = tl.full(r.shape, SPEC.max_bits, tl.int32).to(tl.float32, bitcast=True).to(tl.float64)
    past = (r > amax) | ~finite
    r32 = tl.where(past, 0.0, r).to(tl.float32).to(tl.int32, bitcast=True)
    r32 = tl.where(is_nan, _NAN, tl.where(past, _INF, r32))
    # _finish reads x's sign and whether |x| is zero (formats without zero, unsigned formats)
    return _finish(r32, tl.where(neg, _SIGN, 0), (ua != 0).to(tl.int32), neg, finite, is_nan, None, SPEC)


@triton.jit
def _finish(r, ux, ua, neg, finite, is_nan, scale_exp, SPEC: tl.constexpr):
    """Overflow, formats without zero, unsigned formats and the sign, on the rounded magnitude
    bits r (int32 comparisons order non-negative floats; NaN is excluded explicitly)."""
    if not SPEC.signed:  # negative x is out of range unless its magnitude rounds to 0 (read before
        # overflow, which clamps an unsigned fixed format's negatives to 0); without zero, any negative x
        if SPEC.has_zero:
            out = neg & (r > 0) & ~is_nan
        else:
            out = neg & (ua > 0) & ~is_nan
    if scale_exp is None:
        amax = tl.zeros_like(ua) + SPEC.max_bits
        if SPEC.fixed:
            amax = tl.where(neg, SPEC.neg_max_bits, amax)
    else:  # once per block, broadcast
        amax = _scaled_bits(tl.zeros_like(scale_exp) + SPEC.max_bits, scale_exp)
        if SPEC.fixed:
            amax = tl.where(neg, _scaled_bits(tl.zeros_like(scale_exp) + SPEC.neg_max_bits, scale_exp), amax)
    over = (r > amax) & ~is_nan
    if SPEC.saturate:
        r = tl.where(over, amax, r)
    else:
        # the directed modes never round a finite value past max
        if SPEC.rounding == "toward_zero" or SPEC.rounding == "odd":
            clamp = finite
        elif SPEC.rounding == "up":
            clamp = finite & neg
        elif SPEC.rounding == "down":
            clamp = finite & ~neg
        else:
            clamp = ua < 0  # never
        r = tl.where(over & clamp, amax, r)
        r = tl.where(over & ~clamp, _INF if SPEC.has_inf else _NAN, r)
    if not SPEC.has_zero:  # E8M0: nothing below min_pos, and zero is not a value
        r = tl.where(r < SPEC.min_pos_bits, SPEC.min_pos_bits, r)
        r = tl.where(ua == 0, SPEC.min_pos_bits if SPEC.saturate else _NAN, r)
    if SPEC.signed:
        r = r | (ux & _SIGN)
        if not SPEC.has_nz:
            r = tl.where(r == _SIGN, 0, r)
    else:  # a negative value rounding to 0 gives +0 (r is a magnitude)
        low = 0 if SPEC.has_zero else SPEC.min_pos_bits
        r = tl.where(out, low if SPEC.saturate else _NAN, r)
    return r.to(tl.float32, bitcast=True)


# -- blocks -------------------------------------------------------------------------------------
@triton.jit
def block_scale_exp(amax_bits, ELEM_EMAX: tl.constexpr):
    """A block's shared scale exponent from the bits of its largest magnitude, as
    ``_round_blocks``: floor(log2(amax)) - emax clipped to the E8M0 range; the lowest for an
    all-zero block, the highest for a block holding inf (any for NaN: the block is NaN)."""
    k = tl.minimum(tl.maximum(_exponent(amax_bits) - ELEM_EMAX, _SCALE_MIN), _SCALE_MAX)
    k = tl.where(amax_bits == 0, _SCALE_MIN, k)
    return tl.where(amax_bits >= _INF, _SCALE_MAX, k)


@triton.jit
def round_blocks(x, rbits, SPEC: tl.constexpr):
    """Each row of the 2-D float32 tile ``x`` is one block (zeros past its end), rounded to the
    block format whose element is ``SPEC`` (saturating): every element of a block holding NaN
    becomes NaN.

    Args:
        x: float32 tile of shape (blocks, block size).
        rbits: random words as for ``round_to_format``.
        SPEC: the ``RoundSpec`` of the element format.
    """
    ua = x.to(tl.int32, bitcast=True) & _ABS
    amax = tl.max(ua, axis=1, keep_dims=True)  # bit patterns order as magnitudes, NaN above inf
    k = block_scale_exp(amax, SPEC.elem_emax)
    if SPEC.has_zero:  # an all-zero block rounds to zeros at any scale; at 0, the short path takes it
        k = tl.where(amax == 0, 0, k)
    r = round_to_format(x, rbits, k, SPEC)
    return tl.where(amax > _INF, (tl.zeros_like(ua) + _NAN).to(tl.float32, bitcast=True), r)
