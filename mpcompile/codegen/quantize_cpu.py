"""The C++ CPU quantize kernel: ``triton_round``'s integer rounding, one pass over memory.

Float32 plans (float and fixed-point formats, elementwise or in blocks, every rounding mode)
are rounded here as ``triton_round`` rounds them: on the float32 bit pattern, with its two
short paths (ties to even by add-and-mask, stochastic rounding by adding the random bits to the
dropped ones) and the general path, then ``_finish``'s overflow, zero and sign rules; a block's
scale from its largest magnitude, as ``round_blocks``. Seeded random words are recomputed from
each element's flat index (``random_bits.counter_words``) in 32-bit lanes, whose products wrap
by definition.

The source is scalar C++ that GCC vectorises. Only the rounding mode, the path and where the
random words come from are compiled in: a library per format would be compiled hundreds of
times by a sweep or the tests. The format's numbers and flags are a ``Format`` argument, and
the code is written so that GCC still vectorises with them (see ``pick`` and ``low_bit``). A
library is compiled once (about 0.3 s), and inductor caches it on disk, so another process
loads it in milliseconds.

``fused_cpu.fused_quantize`` calls it for the plans ``takes_plan`` accepts; it is bit-identical
to ``rounding.reference_quantize``.
"""
from __future__ import annotations

import ctypes
import functools
import math

import torch

from ..formats.block_format import SCALE_EXP_MAX, SCALE_EXP_MIN
from ..random_bits import INDEX_FOLD, MIX_MUL1, MIX_MUL2
from ..rounding import ROUNDING_MODES, QuantParams, QuantPlan
from .cpu_kernels import compile_library, require_cpu, threads_for
from .round_spec import RoundSpec, round_spec

__all__ = ["takes_plan", "quantize_cpu", "compiled_libraries"]

_SOURCE = r"""
// the short paths compute float operations for every lane and select: GCC vectorises that only
// where it may assume they do not trap (inductor's flags turn trapping math back on)
#pragma GCC optimize("no-trapping-math")
#include <type_traits>

constexpr uint32_t ABS = 0x7FFFFFFFu, SIGN = 0x80000000u, INF = 0x7F800000u, NAN_BITS = 0x7FC00000u;
enum { NEAREST, NEAREST_AWAY, TOWARD_ZERO, UP, DOWN, ODD, STOCHASTIC };  // rounding.ROUNDING_MODES
enum { NO_BITS, SEEDED, TENSOR };
enum { GENERAL, NEAREST_EVEN, STOCHASTIC_CARRY };
// the random word: 32 bits unless more are asked for (a 64-bit lane halves the vector width)
typedef std::conditional_t<WORD64, uint64_t, uint32_t> word;

/* A format's numbers and flags (round_spec.RoundSpec's), arguments of the kernels. */
typedef struct {
    int32_t man, emin, bias, elem_emax, sr_bits, drop;  // drop: the bits the short paths clear
    uint32_t max, neg_max, min_pos;  // float32 bit patterns
    // the results of three cases, worked out once by the caller (a scalar choice inside the loop
    // stops GCC vectorising it): past max and not clamped; zero in a format without it; a
    // negative value in an unsigned format
    uint32_t past_max, of_zero, below_zero;
    int32_t fixed, saturate, is_signed, has_inf, has_zero, has_nz, ftz, parity_by_exponent;
} Format;

/* flag ? a : b, as a mask: GCC does not vectorise a flag of the format (the same in every lane)
   choosing between vectors */
static inline uint32_t pick(bool flag, uint32_t a, uint32_t b) { uint32_t m = -(uint32_t)flag; return (a & m) | (b & ~m); }
static inline int32_t pick(bool flag, int32_t a, int32_t b) { return (int32_t)pick(flag, (uint32_t)a, (uint32_t)b); }

/* Whether bit 0 of x is set, as a compare of the sign bit: GCC does not vectorise (bool)(x & 1),
   which is what it makes of every spelling of the low bit */
template <typename T>
static inline bool low_bit(T x) { return (T)(x << (sizeof(T) * 8 - 1)) < 0; }

static inline float as_float(uint32_t b) { float f; __builtin_memcpy(&f, &b, 4); return f; }
static inline uint32_t as_bits(float f) { uint32_t b; __builtin_memcpy(&b, &f, 4); return b; }
static inline float pow2(int32_t k) { return as_float((uint32_t)(k + 127) << 23); }  // k in [-126, 127]

static inline uint32_t mix32(uint32_t v) {  // random_bits.mix32
    v ^= v >> 16;
    v *= MIX1;
    v ^= v >> 15;
    v *= MIX2;
    return v ^ (v >> 16);
}

/* floor(log2(a)) from the bits of a positive finite a; a subnormal's exactly (its integer
   significand converts to float32 exactly). */
static inline int32_t exponent_of(int32_t ua) {
    int32_t sub = (int32_t)(as_bits((float)ua) >> 23) - 127 - 149;
    return ua >= 0x800000 ? (ua >> 23) - 127 : sub;
}

/* gfloat's stochastic rule: the fraction rem / 2**s rounded to n bits (ties to even), plus the
   low n random bits, reaches 2**n; in int32 up to n = 30 (SR_WIDE: int64, n <= 62). */
static inline bool stochastic_away(int32_t rem, int32_t s, word rbits, int32_t n) {
    typedef std::conditional_t<SR_WIDE, int64_t, int32_t> wide;
    constexpr int UP_MAX = SR_WIDE ? 62 : 30;
    const wide one = 1, two_n = one << n;
    wide r = rem;
    int32_t k = s - n;
    int32_t kc = k < 1 ? 1 : k > 25 ? 25 : k;  // rem < 2**24, half of 2**25: from there on, d is 0
    wide d_down = (r + ((one << (kc - 1)) - 1) + ((r >> kc) & 1)) >> kc;  // ties to even, by add and shift
    wide d_up = r << (-k < 0 ? 0 : -k > UP_MAX ? UP_MAX : -k);  // rem < 2**s: d_up < 2**n
    wide d = k <= 0 ? d_up : d_down;
    return (s > 0) & (d + (wide)(rbits & (word)(two_n - 1)) >= two_n);
}

/* floor(log2(bits)) - elem_emax clipped to E8M0's range, from the bits of a block's largest
   magnitude (NaN above inf): the block's shared scale exponent; the highest for inf, the lowest
   for an all-zero block, or 0 where the format has zero (any scale rounds zeros to zeros). */
static inline int32_t block_scale_exp(uint32_t amax, const Format& f) {
    int32_t k = exponent_of((int32_t)amax) - f.elem_emax;
    k = k < SCALE_EXP_MIN ? SCALE_EXP_MIN : k > SCALE_EXP_MAX ? SCALE_EXP_MAX : k;
    k = amax == 0 ? (f.has_zero ? 0 : SCALE_EXP_MIN) : k;
    return amax >= INF ? SCALE_EXP_MAX : k;
}

/* The float32 of bits (positive, finite) times 2**k as the reference computes it: two steps of
   2**(k/2); inf past float32's range. */
static inline uint32_t scaled_bits(uint32_t bits, int32_t k) {
    bool over = exponent_of((int32_t)bits) + k > 127;
    k = over ? 0 : k;
    int32_t h = k >> 1;
    uint32_t v = as_bits(as_float(bits) * pow2(h) * pow2(k - h));
    return over ? INF : v;
}

/* Whether |x| = (fl + rem / 2**s) * 2**qe rounds away from zero; half is 2**(s-1); bias is the
   exponent code's (of the unscaled element). */
static inline bool away(int32_t fl, int32_t rem, int32_t half, int32_t s, int32_t qe, int32_t bias, bool neg,
                        word rbits, const Format& f) {
    bool inexact = rem != 0;
    bool odd = low_bit(pick((bool)f.parity_by_exponent, (int32_t)(fl != 0) & (qe + bias), fl));  // man == 0: the exponent's
    if constexpr (ROUNDING == NEAREST) return (rem > half) | ((rem == half) & odd);
    else if constexpr (ROUNDING == NEAREST_AWAY) return rem >= half;
    else if constexpr (ROUNDING == TOWARD_ZERO) return false;
    else if constexpr (ROUNDING == UP) return inexact & !neg;
    else if constexpr (ROUNDING == DOWN) return inexact & neg;
    else if constexpr (ROUNDING == ODD) return inexact & !odd;
    else return stochastic_away(rem, s, rbits, f.sr_bits);
}

/* The general path: |x| = m * 2**unit rounded to a multiple of 2**qe by splitting m at bit
   s = qe - unit; a carry out of the significand runs into the exponent field. The format's
   values are scaled by 2**shift (a block's scale; 0 for elementwise formats). */
static inline uint32_t round_magnitude(int32_t ua, bool neg, bool finite, bool is_nan, word rbits, int32_t shift,
                                       const Format& f) {
    int32_t big_e = ua >> 23;
    int32_t m = big_e > 0 ? (ua & 0x7FFFFF) | 0x800000 : ua;
    int32_t unit = (big_e > 1 ? big_e : 1) - 150;
    int32_t e = exponent_of(ua), emin = f.emin + shift;
    int32_t qe = pick((bool)f.fixed, shift - f.man,
                      pick((bool)f.ftz, e < emin ? emin : e - f.man, (e > emin ? e : emin) - f.man));
    int32_t s = qe - unit;  // s <= 0: x is on the grid
    int32_t sc = s < 1 ? 1 : s > 25 ? 25 : s;
    int32_t fl = m >> sc;
    int32_t rem = s > 0 ? m & ((1 << sc) - 1) : 0;
    uint32_t up = away(fl, rem, 1 << (sc - 1), s, qe, f.bias - shift, neg, rbits, f);
    uint32_t low_s = ((uint32_t)(ua >> sc) + up) << sc;  // s in [1, 23]: both ends share x's frame
    uint32_t high_s = up * (qe > 127 ? INF : (uint32_t)(qe + 127) << 23);  // s >= 24: 0 or 2**qe
    uint32_t r = s <= 0 ? (uint32_t)ua : s <= 23 ? low_s : high_s;
    return finite ? r : is_nan ? NAN_BITS : INF;
}

/* Ties to even on float32's grid with the low 23 - man bits cleared (add half an ulp minus one
   plus the kept lsb, mask); below 2**emin > 2**-126, add and subtract 2**(emin - man + 23),
   which needs emin - man in [-125, 104]. */
static inline uint32_t nearest_even(uint32_t ua, int32_t emin, const Format& f) {
    const uint32_t lsb = 1u << f.drop;
    uint32_t r = (ua + (lsb / 2 - 1) + ((ua >> f.drop) & 1)) & ~(lsb - 1);
    const float c = pow2(emin - f.man + 23);
    bool small = (emin > -126) & (ua < (uint32_t)(emin + 127) << 23);
    float a = as_float(small ? ua : 0);
    return small ? as_bits((a + c) - c) : r;
}

/* Stochastic rounding with 23 - man random bits: the carry out of adding them to the dropped
   bits; below 2**emin > 2**-126, the dropped fraction is rint(a / q * 2**n) on a uniform grid. */
static inline uint32_t stochastic_carry(uint32_t ua, word rbits, const Format& f) {
    const uint32_t low = (1u << f.drop) - 1;
    uint32_t rb = (uint32_t)rbits & low;
    uint32_t r = (ua + rb) & ~low;
    bool small = (f.emin > -126) & (ua < (uint32_t)(f.emin + 127) << 23);
    float t = as_float(small ? ua : 0) * pow2(23 - f.emin);
    int32_t ti = (int32_t)((t + 8388608.0f) - 8388608.0f);  // rint: 2**23 has ulp 1
    return small ? as_bits((float)(int32_t)((ti + (int32_t)rb) >> f.drop) * pow2(f.emin - f.man)) : r;
}

/* Overflow, formats without zero, unsigned formats and the sign, on the rounded magnitude r;
   max and neg_max are the largest magnitudes (scaled, for a block). */
static inline float finish(uint32_t r, uint32_t ux, uint32_t ua, bool neg, bool finite, bool is_nan, uint32_t max,
                           uint32_t neg_max, const Format& f) {
    bool out = neg & !is_nan & (pick((bool)f.has_zero, r, ua) > 0);  // unsigned formats: out of range
    uint32_t amax = pick((bool)f.fixed & neg, neg_max, max);
    bool over = (r > amax) & !is_nan;
    bool clamp = f.saturate;  // the directed modes never round a finite value past max
    if constexpr (ROUNDING == TOWARD_ZERO || ROUNDING == ODD) clamp |= finite;
    else if constexpr (ROUNDING == UP) clamp |= finite & neg;
    else if constexpr (ROUNDING == DOWN) clamp |= finite & !neg;
    r = over ? pick(clamp, amax, f.past_max) : r;
    uint32_t positive = r < f.min_pos ? f.min_pos : r;  // no zero (E8M0): nothing below min_pos
    r = pick((bool)f.has_zero, r, ua == 0 ? f.of_zero : positive);
    uint32_t sign = r | (ux & SIGN);
    sign = !f.has_nz & (sign == SIGN) ? 0 : sign;
    return as_float(pick((bool)f.is_signed, sign, out ? f.below_zero : r));
}

/* x rounded. k, max and neg_max: a block's scale exponent and its scaled largest magnitudes (0
   and the format's own for elementwise formats). SHORT: the path's short form serves x's grid
   (nearest_even; stochastic_carry, for elementwise formats only); else the general path. */
template <bool SHORT>
static inline float round_value(float x, word rbits, int32_t k, uint32_t max, uint32_t neg_max, const Format& f) {
    uint32_t ux = as_bits(x), ua = ux & ABS;
    bool neg = ux >> 31, finite = ua < INF, is_nan = ua > INF;
    uint32_t r;
    if constexpr (SHORT && PATH == NEAREST_EVEN) r = nearest_even(ua, f.emin + k, f);
    else if constexpr (SHORT && PATH == STOCHASTIC_CARRY) r = stochastic_carry(ua, rbits, f);
    else r = round_magnitude((int32_t)ua, neg, finite, is_nan, rbits, k, f);
    return finish(is_nan ? NAN_BITS : r, ux, ua, neg, finite, is_nan, max, neg_max, f);
}

/* counter_words' word of the index whose low 32 bits are low, its bits above folded into fold */
static inline uint32_t counter_word(uint32_t low, uint32_t fold, uint32_t seed) { return mix32(mix32(low ^ fold) ^ seed); }

static inline uint32_t index_fold(int64_t i) { return (uint32_t)((uint64_t)(i >> 32) * FOLD); }

/* The random word of flat index i: bits[i] (TENSOR), counter_words(i, seed) (SEEDED) or none. */
static inline word random_word(int64_t i, uint32_t seed, const int64_t* bits) {
    if constexpr (BITS == SEEDED) return counter_word((uint32_t)i, index_fold(i), seed);
    else if constexpr (BITS == TENSOR) return (word)bits[i];
    else return 0;
}

/* y[i] = x[i] rounded, for i in [0, n); first is x[0]'s flat index in the tensor rounded (the
   random words are the index's). Chunks of 2**14 elements, within which the index's bits above
   32 are one word. */
extern "C" void quantize(const float* x, float* y, const int64_t* bits, uint32_t seed, int64_t n, int64_t first,
                         const Format* format, int threads) {
    constexpr int64_t CHUNK = 1 << 14;
    constexpr bool SHORT = PATH != GENERAL;  // the spec's short path serves every value of the format
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        const Format f = *format;  // a copy per chunk, whose fields GCC keeps in registers
        int64_t start = c * CHUNK, index = first + start;
        int32_t len = (int32_t)(n - start < CHUNK ? n - start : CHUNK);
        if ((index >> 32) != ((index + len - 1) >> 32)) {  // a chunk across 2**32 (first unaligned)
            for (int32_t j = 0; j < len; ++j)
                y[start + j] = round_value<SHORT>(x[start + j], random_word(index + j, seed, bits), 0, f.max, f.neg_max, f);
            continue;
        }
        uint32_t low = (uint32_t)index, fold = index_fold(index);
        const float* xc = x + start;
        float* yc = y + start;
        const int64_t* bc = bits + (BITS == TENSOR ? start : 0);
#pragma omp simd
        for (int32_t j = 0; j < len; ++j) {
            word rbits = 0;
            if constexpr (BITS == SEEDED) rbits = counter_word(low + (uint32_t)j, fold, seed);
            else if constexpr (BITS == TENSOR) rbits = (word)bc[j];
            yc[j] = round_value<SHORT>(xc[j], rbits, 0, f.max, f.neg_max, f);
        }
    }
}

/* Rounds one block of len contiguous elements (x[0] at flat index i0) of scale exponent k and
   largest magnitude amax. */
template <bool SHORT>
static inline void round_block(const float* x, float* y, int64_t i0, int32_t len, int32_t k, uint32_t amax,
                               uint32_t seed, const int64_t* bits, const Format& f) {
    uint32_t max = scaled_bits(f.max, k), neg_max = f.fixed ? scaled_bits(f.neg_max, k) : max;
    if (amax > INF) {  // a block holding NaN is NaN
        for (int32_t t = 0; t < len; ++t) y[t] = as_float(NAN_BITS);
        return;
    }
    for (int32_t t = 0; t < len; ++t)
        y[t] = round_value<SHORT>(x[t], random_word(i0 + t, seed, bits), k, max, neg_max, f);
}

constexpr int TILE = 64;  // blocks side by side: rows of 256 bytes, which the prefetcher follows

/* Rounds w <= TILE blocks side by side (inner > 1): block j's elements are x[t * inner + j] for
   t < len (x[0] at flat index i0). Each row of the tile is contiguous, so the loops over j
   vectorise, a lane per block. */
template <bool SHORT>
static inline void round_tile(const float* x, float* y, int64_t i0, int32_t len, int64_t inner, int32_t w,
                              const uint32_t* amax, const int32_t* k, uint32_t seed, const int64_t* bits,
                              const Format& f) {
    uint32_t max[TILE], neg_max[TILE];
    for (int32_t j = 0; j < w; ++j) {
        max[j] = scaled_bits(f.max, k[j]);
        neg_max[j] = f.fixed ? scaled_bits(f.neg_max, k[j]) : max[j];
    }
    for (int32_t t = 0; t < len; ++t)
        for (int32_t j = 0; j < w; ++j) {
            int64_t at = t * inner + j;
            float r = round_value<SHORT>(x[at], random_word(i0 + at, seed, bits), k[j], max[j], neg_max[j], f);
            y[at] = amax[j] > INF ? as_float(NAN_BITS) : r;  // a block holding NaN is NaN
        }
}

/* Whether nearest_even serves a block of scale exponent k (its emin - man in [-125, 104]). */
static inline bool short_path(int32_t k, const Format& f) {
    int32_t e = f.emin + k - f.man;
    return PATH == NEAREST_EVEN && e >= -125 && e <= 104;
}

/* Block formats on a contiguous x viewed as (outer, length, inner): blocks of block_size along
   length, the last of a line shorter where block_size does not divide it. */
extern "C" void quantize_blocks(const float* x, float* y, const int64_t* bits, uint32_t seed, int64_t outer,
                                int64_t length, int64_t inner, int64_t block_size, const Format* format,
                                int threads) {
    int64_t per_line = (length + block_size - 1) / block_size, lines = outer * per_line;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t l = 0; l < lines; ++l) {
        const Format f = *format;
        int64_t start = l % per_line * block_size;
        int32_t len = (int32_t)(length - start < block_size ? length - start : block_size);
        int64_t base = (l / per_line * length + start) * inner;
        if (inner == 1) {
            uint32_t amax = 0;  // bit patterns order as magnitudes, NaN above inf
            for (int32_t t = 0; t < len; ++t) {
                uint32_t a = as_bits(x[base + t]) & ABS;
                amax = a > amax ? a : amax;
            }
            int32_t k = block_scale_exp(amax, f);
            if (short_path(k, f)) round_block<true>(x + base, y + base, base, len, k, amax, seed, bits, f);
            else round_block<false>(x + base, y + base, base, len, k, amax, seed, bits, f);
            continue;
        }
        for (int64_t i = 0; i < inner; i += TILE) {
            int32_t w = (int32_t)(inner - i < TILE ? inner - i : TILE);
            const float* xt = x + base + i;
            uint32_t amax[TILE] = {};
            int32_t k[TILE];
            for (int32_t t = 0; t < len; ++t)
                for (int32_t j = 0; j < w; ++j) {
                    uint32_t a = as_bits(xt[t * inner + j]) & ABS;
                    amax[j] = a > amax[j] ? a : amax[j];
                }
            bool all_short = true;
            for (int32_t j = 0; j < w; ++j) {
                k[j] = block_scale_exp(amax[j], f);
                all_short &= short_path(k[j], f);
            }
            if (all_short) round_tile<true>(xt, y + base + i, base + i, len, inner, w, amax, k, seed, bits, f);
            else round_tile<false>(xt, y + base + i, base + i, len, inner, w, amax, k, seed, bits, f);
        }
    }
}
"""


class _Format(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in ("man", "emin", "bias", "elem_emax", "sr_bits", "drop")] + [
        (name, ctypes.c_uint32) for name in ("max", "neg_max", "min_pos", "past_max", "of_zero", "below_zero")] + [
        (name, ctypes.c_int32) for name in ("fixed", "saturate", "is_signed", "has_inf", "has_zero", "has_nz", "ftz",
                                            "parity_by_exponent")]


_LIBRARIES: dict[tuple[str, str, int, bool, bool], ctypes.CDLL] = {}


def compiled_libraries() -> int:
    """How many libraries this process has loaded."""
    return len(_LIBRARIES)


def takes_plan(plan: QuantPlan) -> bool:
    """Whether the kernel rounds this plan: float32 values, elementwise or in blocks (up to the 62
    random bits a value that ``quantize`` allows: gfloat's stochastic sum stays in an int64)."""
    return plan.dtype == torch.float32


def _library(spec: RoundSpec, bits: str) -> ctypes.CDLL:
    """The library for the spec's rounding mode, path and random words (its numbers and other
    flags are arguments: a library per format would be compiled hundreds of times by a sweep)."""
    path = 1 if spec.nearest_even else 2 if spec.stochastic_carry else 0  # the source's enum of paths
    stochastic = spec.rounding == "stochastic"
    key = (spec.rounding, bits, path, stochastic and spec.sr_bits > 30, stochastic and spec.sr_bits > 32)
    lib = _LIBRARIES.get(key)
    if lib is None:
        lib = compile_library(
            f"constexpr int ROUNDING = {ROUNDING_MODES.index(spec.rounding)}, BITS = {_BITS.index(bits)}, PATH = {path}, "
            f"SR_WIDE = {int(key[3])}, WORD64 = {int(key[4])};\n"
            f"constexpr int SCALE_EXP_MIN = {SCALE_EXP_MIN}, SCALE_EXP_MAX = {SCALE_EXP_MAX};\n"
            f"constexpr uint32_t MIX1 = {MIX_MUL1}u, MIX2 = {MIX_MUL2 % 2**32}u, FOLD = {INDEX_FOLD}u;\n" + _SOURCE)
        common = [ctypes.c_void_p] * 3 + [ctypes.c_uint32]
        lib.quantize.restype = lib.quantize_blocks.restype = None
        lib.quantize.argtypes = common + [ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(_Format), ctypes.c_int]
        lib.quantize_blocks.argtypes = common + [ctypes.c_int64] * 4 + [ctypes.POINTER(_Format), ctypes.c_int]
        _LIBRARIES[key] = lib
    return lib


_BITS = ("none", "seeded", "tensor")  # the source's enum of where random words come from


@functools.lru_cache(maxsize=256)
def _format(spec: RoundSpec) -> _Format:
    nan, inf = 0x7FC00000, 0x7F800000
    of_zero, below_zero = (spec.min_pos_bits, 0 if spec.has_zero else spec.min_pos_bits) if spec.saturate else (nan, nan)
    return _Format(spec.man, spec.emin, spec.bias, spec.elem_emax, spec.sr_bits,
                   23 - spec.man if 0 <= spec.man <= 22 else 1, spec.max_bits, spec.neg_max_bits, spec.min_pos_bits,
                   inf if spec.has_inf else nan, of_zero, below_zero, spec.fixed, spec.saturate, spec.signed, spec.has_inf, spec.has_zero, spec.has_nz, spec.ftz,
                   spec.parity_by_exponent)


def quantize_cpu(x: torch.Tensor, plan: QuantPlan, params: QuantParams, bits: torch.Tensor | None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``reference_quantize`` for a plan of ``takes_plan``: same contract, bit-identical results.

    Args:
        x: float32 CPU values.
        plan, params: from ``plan_quantize``.
        bits: for stochastic rounding, an integer tensor of x's shape holding the random bits,
            or (``plan.seeded``) the 0-d seed of ``counter_bits``.
        out: a contiguous float32 tensor of x's size the result is written into (returned);
            None: a new one.

    Raises:
        ValueError: a plan the kernel does not take, or stochastic rounding without bits.
    """
    if not takes_plan(plan) or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"quantize_cpu: takes float32 CPU values and a float32 plan; got {x.dtype} on {x.device} "
                         f"for {plan}")
    mode, seed, words = "none", 0, None
    if plan.rounding == "stochastic":
        if bits is None:
            raise ValueError("quantize_cpu: stochastic rounding needs random bits or a seed, got None")
        if plan.seeded:
            mode, seed = "seeded", int(bits)
        else:
            mode, words = "tensor", bits.reshape(x.shape).to(torch.int64).contiguous()
    xc = x.contiguous()
    if out is None:
        out = torch.empty_like(xc)
    else:
        require_cpu("quantize_cpu: out", out, (torch.float32,), xc.numel())
    n = xc.numel()
    if n == 0:
        return out
    spec = round_spec(plan, params)
    lib, fmt = _library(spec, mode), ctypes.byref(_format(spec))
    pointers = (xc.data_ptr(), out.data_ptr(), None if words is None else words.data_ptr(), seed)
    if plan.block_size is None:
        lib.quantize(*pointers, n, 0, fmt, threads_for(n))
    else:
        shape = x.shape if x.dim() else (1,)
        axis = plan.axis % len(shape)
        length, inner = shape[axis], math.prod(shape[axis + 1:])
        lib.quantize_blocks(*pointers, n // (length * inner), length, inner, plan.block_size, fmt, threads_for(n))
    return out
