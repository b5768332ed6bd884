"""The communication hook's CPU kernels, in C++: rounding to codes, the ranks' sum, block amaxes.

The hook rounds a 25 MB bucket: scale by a power of two, clamp, cast to the format's torch dtype
(the OCP fp8s, bf16, fp16) and, with error feedback, widen the codes back and keep
``(scaled - q) * 2**e``; then every rank's codes are widened, scaled and summed. In torch each of
these is a pass over the bucket, and torch's casts between fp8 and float32 cost 0.4 to 4 ns an
element on the CPU. Here the rounding is one vectorised loop and the sum one over all ranks'
codes (GCC's vector extension, eight lanes), computing what torch computes: c10's conversions
written lane-wise (e4m3fn saturating to +-448, as torch's CPU cast does), the float32 values
torch's widening casts give (NaN payloads included), and the sum's fused multiply-adds as
torch's ``add(alpha=)`` / ``addcmul`` take them. So the codes, residuals and means are
bit-identical to the torch path. A block's amax is one pass instead of torch's ``amax`` and
``amin`` over (blocks, 32) rows. Compiled once by inductor's C++ toolchain
(``cpu_kernels.compile_library``); the hook falls back to torch with a warning where that fails.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from .cpu_kernels import compile_library, require_cpu, threads_for

__all__ = ["CODE_DTYPES", "load_kernel", "quantize_codes_", "accumulate_codes_", "block_amax"]

CODE_DTYPES = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1, torch.bfloat16: 2, torch.float16: 3}  # the source's enum

_SOURCE = r"""
#include <omp.h>
#include <type_traits>
enum { E4M3, E5M2, BF16, FP16 };  /* CODE_DTYPES' numbers */
template <int F> using code_t = typename std::conditional<(F < BF16), uint8_t, uint16_t>::type;
typedef uint16_t h8 __attribute__((vector_size(16)));
static inline u8 bits_of(f8 x) { u8 b; __builtin_memcpy(&b, &x, 32); return b; }
static inline f8 float_of(u8 b) { f8 x; __builtin_memcpy(&x, &b, 32); return x; }
static inline u8 splat(uint32_t v) { return (u8){} + v; }
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
/* What the vector extension compiles poorly, in AVX2 where there is AVX2. */
#if defined(__AVX2__) && defined(__FMA__)
static inline f8 fma8(f8 a, f8 b, f8 c) { return (f8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
static inline void store_codes(uint8_t* p, u8 q) {  /* the low byte of each lane: two packs, two 4-byte stores */
    __m256i w = _mm256_packus_epi16(_mm256_packus_epi32((__m256i)q, (__m256i)q), (__m256i)q);
    uint32_t lo = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(w));
    uint32_t hi = (uint32_t)_mm_cvtsi128_si32(_mm256_extracti128_si256(w, 1));
    __builtin_memcpy(p, &lo, 4);
    __builtin_memcpy(p + 4, &hi, 4);
}
static inline void store_codes(uint16_t* p, u8 q) {  /* the low half of each lane */
    __m128i h = _mm_packus_epi32(_mm256_castsi256_si128((__m256i)q), _mm256_extracti128_si256((__m256i)q, 1));
    _mm_storeu_si128((__m128i*)p, h);
}
static inline u8 load_codes(const uint8_t* p) { return (u8)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
static inline u8 load_codes(const uint16_t* p) { return (u8)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)); }
#else
static inline f8 fma8(f8 a, f8 b, f8 c) { f8 r; for (int j = 0; j < 8; ++j) r[j] = fmaf(a[j], b[j], c[j]); return r; }
static inline void store_codes(uint8_t* p, u8 q) { b8 b = __builtin_convertvector(q, b8); __builtin_memcpy(p, &b, 8); }
static inline void store_codes(uint16_t* p, u8 q) { h8 h = __builtin_convertvector(q, h8); __builtin_memcpy(p, &h, 16); }
static inline u8 load_codes(const uint8_t* p) { b8 b; __builtin_memcpy(&b, p, 8); return __builtin_convertvector(b, u8); }
static inline u8 load_codes(const uint16_t* p) { h8 h; __builtin_memcpy(&h, p, 16); return __builtin_convertvector(h, u8); }
#endif

/* torch's CPU casts from float32, eight lanes at a time. e4m3fn: c10's fp8e4m3fn_from_fp32_value
   but saturating to +-448 as torch's CPU cast does (NaN to NaN). e5m2 and fp16: c10's
   fp8e5m2_from_fp32_value, of which fp16 is the 10-bit-mantissa case (torch's fp16 cast is the
   CPU's, which keeps a NaN's payload). bf16: torch's vectorised rounding (every NaN 0xffff). For
   the floats, both roads (a float add that rounds a small value into place; the rounding bias
   added to the bits of a normal one) are taken and the lane's one selected. */
template <int F>
static inline u8 narrow(f8 f) {
    u8 b = bits_of(f);
    if (F == BF16) {
        u8 r = (b + 0x7FFFu + ((b >> 16) & 1)) >> 16;
        return f != f ? splat(0xFFFF) : r;
    }
    const uint32_t shift = F == E5M2 ? 21 : F == FP16 ? 13 : 20;
    const uint32_t denorm = F == E5M2 ? (134u << 23) : F == FP16 ? (126u << 23) : (141u << 23);
    const uint32_t smallest_normal = F == E4M3 ? (121u << 23) : (113u << 23);
    const uint32_t bias = F == E4M3 ? 7 : 15;
    const uint32_t rebias = ((bias - 127) << 23) + (1u << (shift - 1)) - 1;
    u8 sign = b & 0x80000000u;
    b ^= sign;
    u8 small = bits_of(float_of(b) + float_of(splat(denorm))) - denorm;
    u8 normal = (b + rebias + ((b >> shift) & 1)) >> shift;
    u8 r = b < smallest_normal ? small : normal;
    if (F == E4M3) {
        r = r > 0x7E ? splat(0x7E) : r;  /* past 448 (a rounding up to 480): saturate */
        r = b > (255u << 23) ? splat(0x7F) : r;  /* NaN */
    } else {
        const uint32_t inf = F == E5M2 ? 0x7C : 0x7C00;
        r = b >= (143u << 23) ? splat(inf) : r;  /* past the largest finite value: inf */
        u8 nan = F == E5M2 ? splat(0x7F) : ((b >> shift) & 0x3FF) | 0x7E00;
        r = b > (255u << 23) ? nan : r;
    }
    return r | (sign >> (F < BF16 ? 24 : 16));
}

/* The float32 value of each code, as torch's cast gives it: e4m3fn's NaN 0x7ff00000; e5m2 by
   way of fp16, and fp16, through the CPU's conversion, which quiets NaNs; bf16 by a shift. */
template <int F>
static inline f8 widen(u8 c) {
    if (F == BF16) return float_of(c << 16);
#if defined(__F16C__) && defined(__AVX2__)
    if (F != E4M3) {  /* e5m2 is fp16's top byte: fp16's own conversion, as torch's cast takes it */
        __m256i h = F == E5M2 ? _mm256_slli_epi32((__m256i)c, 8) : (__m256i)c;
        __m128i h16 = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        return (f8)_mm256_cvtph_ps(h16);
    }
    /* e4m3's exponent and mantissa, shifted into fp16's, are an fp16 of 2**-8 times the value
       (subnormals too); times 256 exactly. NaN (0x7f) is the one code that needs its own lane. */
    __m256i h = _mm256_or_si256(_mm256_slli_epi32((__m256i)(c & 0x7F), 7), _mm256_slli_epi32((__m256i)(c & 0x80), 8));
    __m128i h16 = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    f8 v = (f8)_mm256_cvtph_ps(h16) * 256.0f;
    return (c & 0x7F) == 0x7F ? float_of(splat(0x7FF00000u) | ((c & 0x80) << 24)) : v;
#else
    const uint32_t mant_bits = F == E4M3 ? 3 : F == E5M2 ? 2 : 10;
    const uint32_t exp_mask = F == E4M3 ? 15 : 31;
    const uint32_t bits = F == FP16 ? 16 : 8;
    u8 sign = (c >> (bits - 1)) << 31;
    u8 e = (c >> mant_bits) & exp_mask;
    u8 m = c & ((1u << mant_bits) - 1);
    u8 normal = ((e + (F == E4M3 ? 120 : 112)) << 23) | (m << (23 - mant_bits));
    f8 sub = __builtin_convertvector((i8)m, f8) * (F == E4M3 ? 0x1p-9f : F == E5M2 ? 0x1p-16f : 0x1p-24f);
    u8 r = e == 0 ? bits_of(sub) : normal;
    if (F == E4M3) r = (c & 0x7F) == 0x7F ? splat(0x7FF00000u) : r;
    else r = e == 31 ? (0x7F800000u | (m << (23 - mant_bits)) | (m != 0 ? splat(0x400000) : splat(0))) : r;
    return float_of(r | sign);
#endif
}

/* codes = cast(clamp(x * down, -bound, bound)) (clamped where bound is finite) and, with
   residual, residual = (x * down - float(codes)) * up; down / up: one factor per unit elements
   (unit = n: one for all). A group of fewer than eight (a unit's tail) goes through a zeroed
   vector. */
template <int F>
static inline void quantize_group(const float* x, code_t<F>* codes, float* residual, int k, float d, float u,
                                  float bound) {
    f8 v = {};
    __builtin_memcpy(&v, x, 4 * k);
    v = v * d;
    f8 c = v;
    if (bound != INFINITY) {  /* torch's clamp: NaN stays NaN */
        c = c < -bound ? (f8){} - bound : c;
        c = c > bound ? (f8){} + bound : c;
    }
    u8 q = narrow<F>(c);
    if (k == 8) store_codes(codes, q);
    else for (int j = 0; j < k; ++j) codes[j] = (code_t<F>)q[j];
    if (residual) {
        f8 r = (v - widen<F>(q)) * u;
        __builtin_memcpy(residual, &r, 4 * k);
    }
}

template <int F>
static void quantize(const float* x, code_t<F>* codes, float* residual, int64_t n, const float* down,
                     const float* up, int64_t unit, float bound) {
    for (int64_t start = 0, b = 0; start < n; start += unit, ++b) {
        int64_t end = start + unit < n ? start + unit : n, i = start;
        for (; i + 8 <= end; i += 8)
            quantize_group<F>(x + i, codes + i, residual ? residual + i : 0, 8, down[b], up[b], bound);
        if (i < end)
            quantize_group<F>(x + i, codes + i, residual ? residual + i : 0, (int)(end - i), down[b], up[b], bound);
    }
}

/* total = the ranks' float(codes) * f summed in rank order, as torch's mul, add(alpha=f) and
   addcmul compute it (a multiply, then fused multiply-adds), divided by the number of ranks:
   each rank's codes read once, total written once. One f per unit elements, per rank. */
template <int F>
static inline f8 rank_values(const code_t<F>* codes, int k) {
    u8 c = {};
    if (k == 8) c = load_codes(codes);
    else for (int j = 0; j < k; ++j) c[j] = codes[j];
    return widen<F>(c);
}

template <int F>
static inline void accumulate_group(const code_t<F>* const* codes, const f8* f, int ranks, float* __restrict total,
                                    int64_t i, int k, f8 divisor) {
    f8 t = rank_values<F>(codes[0] + i, k) * f[0];
    for (int r = 1; r < ranks; ++r) t = fma8(rank_values<F>(codes[r] + i, k), f[r], t);
    t = t / divisor;
    __builtin_memcpy(total + i, &t, 4 * k);
}

template <int F>
static void accumulate(const code_t<F>* const* codes, const float* const* factors, int ranks, float* __restrict total,
                       int64_t n, int64_t unit) {
    f8 f[ranks];
    const f8 divisor = (f8){} + (float)ranks;
    for (int64_t start = 0, b = 0; start < n; start += unit, ++b) {
        int64_t end = start + unit < n ? start + unit : n, i = start;
        for (int r = 0; r < ranks; ++r) f[r] = (f8){} + factors[r][b];
        for (; i + 8 <= end; i += 8) accumulate_group<F>(codes, f, ranks, total, i, 8, divisor);
        if (i < end) accumulate_group<F>(codes, f, ranks, total, i, (int)(end - i), divisor);
    }
}

/* out[b] = max |x| over block b (unit elements; the last may be shorter), NaN if it holds one:
   torch.maximum(amax, -amin). */
static void amaxes(const float* x, int64_t n, int64_t unit, float* out) {
    for (int64_t start = 0, b = 0; start < n; start += unit, ++b) {
        float h, l;
        int nan = extremes(x + start, (start + unit < n ? start + unit : n) - start, &h, &l);
        out[b] = nan ? NAN : (h > -l ? h : -l);
    }
}

/* This thread's share [*first, *end) of n elements: whole blocks of unit, or (one block, one
   factor) any run of 64. Sets *block (the share's first block) and *size (its block size). */
static inline int share(int64_t n, int64_t unit, int64_t* first, int64_t* end, int64_t* block, int64_t* size) {
    int64_t grain = unit < n ? unit : 64, grains = (n + grain - 1) / grain;
    int t = omp_get_thread_num(), threads = omp_get_num_threads();
    *first = grains * t / threads * grain;
    *end = grains * (t + 1) / threads * grain;
    *end = *end < n ? *end : n;
    *block = unit < n ? *first / unit : 0;
    *size = unit < n ? unit : *end - *first;
    return *first < *end;
}

extern "C" void block_amax(const float* x, int64_t n, int64_t unit, float* out, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t first, end, block, size;
        if (share(n, unit, &first, &end, &block, &size)) amaxes(x + first, end - first, size, out + block);
    }
}

template <int F>
static void quantize_share(const float* x, void* codes, float* residual, int64_t n, const float* down,
                           const float* up, int64_t unit, float bound) {
    int64_t first, end, block, size;
    if (share(n, unit, &first, &end, &block, &size))
        quantize<F>(x + first, (code_t<F>*)codes + first, residual ? residual + first : 0, end - first, down + block,
                    up + block, size, bound);
}

extern "C" void quantize_codes(const float* x, void* codes, float* residual, int64_t n, const float* down,
                               const float* up, int64_t unit, float bound, int format, int threads) {
    static void (*const by_format[])(const float*, void*, float*, int64_t, const float*, const float*, int64_t,
                                     float) = {quantize_share<E4M3>, quantize_share<E5M2>, quantize_share<BF16>,
                                               quantize_share<FP16>};
#pragma omp parallel num_threads(threads) if (threads > 1)
    by_format[format](x, codes, residual, n, down, up, unit, bound);
}

template <int F>
static void accumulate_share(const void* const* codes, const float* const* factors, int ranks, float* total,
                             int64_t n, int64_t unit) {
    int64_t first, end, block, size;
    if (share(n, unit, &first, &end, &block, &size)) {
        const code_t<F>* c[ranks];
        const float* f[ranks];
        for (int r = 0; r < ranks; ++r) c[r] = (const code_t<F>*)codes[r] + first, f[r] = factors[r] + block;
        accumulate<F>(c, f, ranks, total + first, end - first, size);
    }
}

extern "C" void accumulate_codes(const void* const* codes, const float* const* factors, int ranks, float* total,
                                 int64_t n, int64_t unit, int format, int threads) {
    static void (*const by_format[])(const void* const*, const float* const*, int, float*, int64_t, int64_t) = {
        accumulate_share<E4M3>, accumulate_share<E5M2>, accumulate_share<BF16>, accumulate_share<FP16>};
#pragma omp parallel num_threads(threads) if (threads > 1)
    by_format[format](codes, factors, ranks, total, n, unit);
}
"""


@functools.lru_cache(maxsize=None)
def load_kernel() -> ctypes.CDLL:
    """The compiled library (compiled on the first call, then from inductor's disk cache)."""
    lib = compile_library(_SOURCE)
    pointer, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.quantize_codes.restype = lib.accumulate_codes.restype = lib.block_amax.restype = None
    lib.block_amax.argtypes = [pointer, i64, i64, pointer, i32]
    lib.quantize_codes.argtypes = [pointer, pointer, pointer, i64, pointer, pointer, i64, f32, i32, i32]
    lib.accumulate_codes.argtypes = [pointer, pointer, i32, pointer, i64, i64, i32, i32]
    return lib


def _factors(factors: torch.Tensor | None, n: int, unit: int | None) -> tuple[torch.Tensor, int]:
    """The factors as the kernel takes them (one per ``unit`` elements) and the unit: a single
    factor (or none: 1) covers all ``n``."""
    if factors is None:
        factors = torch.ones(1)
    one = factors.numel() == 1
    require_cpu("code kernels: factors", factors, (torch.float32,))
    if not (one or unit is not None and factors.numel() == -(-n // unit)):
        raise ValueError(f"code kernels: float32 factors, one or one per unit of the {n} elements; got "
                         f"{factors.numel()} factors, unit {unit}")
    return factors, max(n, 1) if one else unit


def quantize_codes_(x: torch.Tensor, codes: torch.Tensor, residual: torch.Tensor | None, down: torch.Tensor | None,
                    up: torch.Tensor | None, unit: int | None, bound: float | None) -> None:
    """``codes`` = ``x * down`` clamped to +-``bound`` (if set) and cast to ``codes.dtype`` (one
    of ``CODE_DTYPES``); ``residual`` (if given) = ``(x * down - codes) * up``. Bit for bit as torch's
    ``mul``, ``clamp``, cast and ``sub`` compute them.

    Args:
        x: float32.
        codes: of a dtype in ``CODE_DTYPES``, ``x``'s size.
        residual: float32, ``x``'s size, or None.
        down, up: float32 powers of two: one (or None: 1), or one per ``unit`` elements.
        unit: elements per factor, where there are several.
        bound: the clamp's bound, or None.
    """
    n = x.numel()
    require_cpu("quantize_codes_: x", x, (torch.float32,), n)
    require_cpu("quantize_codes_: codes", codes, tuple(CODE_DTYPES), n)
    if residual is not None:
        require_cpu("quantize_codes_: residual", residual, (torch.float32,), n)
    (down, unit_), (up, _) = _factors(down, n, unit), _factors(up, n, unit)
    load_kernel().quantize_codes(x.data_ptr(), codes.data_ptr(), 0 if residual is None else residual.data_ptr(), n,
                                 down.data_ptr(), up.data_ptr(), unit_, float("inf") if bound is None else bound,
                                 CODE_DTYPES[codes.dtype], threads_for(n))


def accumulate_codes_(codes: list[torch.Tensor], total: torch.Tensor, factors: list[torch.Tensor | None],
                      unit: int | None) -> torch.Tensor:
    """``total`` = the mean of the ranks' ``codes * factors``, summed in rank order: bit for bit
    as torch's cast, ``mul_`` (the first rank), ``add_(alpha=)`` / ``addcmul_`` (the others) and
    ``div_`` compute it.

    Args:
        codes: each rank's codes, of one dtype in ``CODE_DTYPES``, ``total``'s size.
        total: float32, overwritten.
        factors, unit: each rank's factors, as ``quantize_codes_``'s ``down``.
    """
    n = total.numel()
    require_cpu("accumulate_codes_: total", total, (torch.float32,), n)
    require_cpu("accumulate_codes_: codes", codes[0], tuple(CODE_DTYPES), n)
    for c in codes[1:]:
        require_cpu("accumulate_codes_: codes", c, (codes[0].dtype,), n)
    checked = [_factors(f, n, unit) for f in factors]
    if len({u for _, u in checked}) != 1 or len(checked) != len(codes):
        raise ValueError("accumulate_codes_: one factor tensor per rank, all one or all one per unit")
    pointers = ctypes.c_void_p * len(codes)
    load_kernel().accumulate_codes(pointers(*(c.data_ptr() for c in codes)), pointers(*(f.data_ptr() for f, _ in checked)),
                                   len(codes), total.data_ptr(), n, checked[0][1], CODE_DTYPES[codes[0].dtype],
                                   threads_for(n))
    return total


def block_amax(x: torch.Tensor, unit: int) -> torch.Tensor:
    """Each block's (``unit`` elements of float32 ``x``; the last may be shorter) largest
    magnitude, NaN where it holds a NaN: ``torch.maximum(amax, -amin)`` per block."""
    require_cpu("block_amax: x", x, (torch.float32,))
    out = torch.empty(-(-x.numel() // unit), dtype=torch.float32)
    load_kernel().block_amax(x.data_ptr(), x.numel(), unit, out.data_ptr(), threads_for(x.numel()))
    return out
