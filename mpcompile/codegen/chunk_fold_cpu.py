"""C++ CPU kernels of emulated GEMMs: the rounding of chunk sums, and GEMMs of products one by one.

``chunk(k)`` accumulation adds each chunk's exact sum of products into the accumulator and
rounds: ``acc = round(acc + P_j)`` for j = 0, 1, ... in order. The chunk sums P come from one
float64 GEMM over all chunks; what is left is this fold, which in torch is some twenty
operations per chunk, each a pass over the output (and a Python loop over the chunks). Here it
is one pass: a tile of the accumulator stays in L1 while every chunk's sums stream through it.
Each step is ``ops.exact.round_exact`` of ``two_sum(acc, P_j)`` to nearest, operation for
operation (``-ffp-contract=off``: nothing fuses), so the result is bit-identical to the torch
fold.

``chunk_products_`` runs a whole GEMM whose products are formed one by one, as ``ops.emulate``'s
steps form them: where they are rounded (a ``mul`` format, to nearest), where the order is
``sequential`` (chunks of one product), and for exact chunk sums where b is small enough to stay
in cache. For 8 vectors of 8 output columns at a time it multiplies each a[i, u] by
b[u, n:n + 8] (exact in float64 for float32 operands), rounds the product as
``ops.exact.round_float`` does where there is a ``mul`` format, adds it to the chunk's partial
sum (which starts at the chunk's first product) and, at the chunk's end, folds the partial sum
into the accumulator; partial sums and accumulators never leave registers. Where the ``mul``
format fits float32 (``rounds_in_float32``: fp8, fp16) the products are rounded in float32
lanes instead (16 to a vector, 4 vectors at a time), by a fused multiply-add on the exact
product, and a chunk's rounded products are summed in one or two float32 sums where
``float32_sums`` proves them exact, or as int32 counts of the smallest subnormal where
``integer_sums`` does.

Compiled once by inductor's C++ toolchain (``cpu_kernels.compile_library``); where that fails
the caller works in torch. A plug-in of the torch backend: ``backends.load_plugins`` imports
it, and it registers itself with ``ops.emulate.register_chunk_fold``.
"""
from __future__ import annotations

import ctypes
import functools
import math

import torch

from ..ops.emulate import ChunkFold, register_chunk_fold
from ..ops.exact import Grid
from .cpu_kernels import compile_library, require_cpu, threads_for

__all__ = ["load_kernel", "takes_grid", "rounds_in_float32", "float32_sums", "integer_sums", "fold_chunks_",
           "chunk_products_", "offset_gemm_"]

_TILE = 512  # accumulator elements a thread keeps in L1 while the chunks stream through
_BLOCK_STEPS = 1 << 12  # offset_gemm's steps a tile takes before the next (the block's operands stay in cache)
_SHAPES = ((24, 1), (12, 2), (8, 3), (6, 4))  # offset_gemm's tiles: (rows, vectors), as its source lists them
_TILES = 8  # vectors of 8 output columns whose accumulators chunk_products interleaves (or TILES / 2 of 16)
_FLOAT32_SUMS_FROM = 8  # chunk length from which float32_sums sums a chunk in float32
_INT32_COUNTS = 2.0**31  # what integer_sums' partial sums must stay below, in counts of the smallest subnormal

_SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>
typedef double d8 __attribute__((vector_size(64)));
typedef int64_t l8 __attribute__((vector_size(64)));
typedef struct {
    double qmin, max, min_normal, split, big, magic_qmin, half_scale;
    int has_inf, neg_zero;
} grid_t;

static inline d8 splat(double v) { return (d8){v, v, v, v, v, v, v, v}; }  /* not 0 + v: that is +0 for -0 */
static inline f8 splat32(float v) { return (f8){v, v, v, v, v, v, v, v}; }
/* c + a * b, rounded once: where a * b is exact in double (float32 factors) this is c + (a * b) */
static inline d8 fma8(d8 a, d8 b, d8 c) {
#ifdef __AVX512F__
    return _mm512_fmadd_pd(a, b, c);
#else
    for (int l = 0; l < 8; ++l) c[l] = __builtin_fma(a[l], b[l], c[l]);
    return c;
#endif
}
static inline d8 abs8(d8 x) { l8 b; __builtin_memcpy(&b, &x, 64); b &= 0x7FFFFFFFFFFFFFFFll; __builtin_memcpy(&x, &b, 64); return x; }

/* round_exact(s, e, grid, "nearest") of ops.exact, lane by lane, for the exact value s + e:
   the same operations in the same order (Veltkamp's split, Rump's ufp, the tie decided by e). */
static inline d8 round_nearest(d8 s, d8 e, const grid_t* g) {
    d8 big = splat(g->big);
    d8 xc = s < -big ? -big : (s > big ? big : s);  /* torch.clamp: NaN stays NaN */
    d8 c = xc * g->split;
    d8 m = splat(g->magic_qmin);
    d8 rn = abs8(xc) < g->min_normal ? (xc + m) - m : c - (c - xc);
    d8 q = xc * (4503599627370496.0 + 1.0);
    d8 ufp = abs8(q - q * (1.0 - 0x1p-53));
    d8 scaled = ufp * g->half_scale;
    d8 half = (scaled < g->qmin ? splat(g->qmin) : scaled) * 0.5;
    l8 tie = (abs8(xc - rn) == half) & (e != 0);
    d8 r = tie ? xc + (e > 0 ? half : -half) : rn;
    r = abs8(r);
    r = r > g->max ? splat(g->has_inf ? INFINITY : NAN) : r;
    r = s < 0 ? -r : r;
    return r == 0 ? (g->neg_zero ? s * 0.0 : splat(0.0)) : r;
}

/* round_float(p, grid, "nearest", SIGNS, OVERFLOW) of ops.exact, for p normal in double: p's quantum u
   on the grid is 2**-man times its binade's 2**e, or min_normal's below it; C = 1.5 * 2**52 * u has
   ulp u (and an even multiple of it), so p + C rounds p to nearest even on the grid, and - C is exact.
   Five operations for both ranges (Veltkamp's split and the subnormal magic add with a select: eight).
   OVERFLOW: inf (or NaN) from the overflow threshold on; SIGNS: a zero signed as p (else it may be +0
   where p is negative). */
template <bool SIGNS = true, bool OVERFLOW = true>
static inline d8 round_product(d8 p, const grid_t* g, double overflow) {
    l8 bits;
    int64_t floor;
    __builtin_memcpy(&bits, &p, 64);
    __builtin_memcpy(&floor, &g->min_normal, 8);
    bits &= 0x7FF0000000000000ll;  /* 2**e, e = p's binade */
    bits = bits > floor ? bits : floor;
    d8 binade;
    __builtin_memcpy(&binade, &bits, 64);
    d8 c = binade * (6755399441055744.0 * g->half_scale);  /* 1.5 * 2**52 * u */
    d8 r = (p + c) - c;
    if (OVERFLOW) r = abs8(p) >= overflow ? (g->has_inf ? p * INFINITY : splat(NAN)) : r;
    if (SIGNS) r = r == 0 ? (g->neg_zero ? p * 0.0 : splat(0.0)) : r;
    return r;
}

static inline d8 widen8(f8 x) {  /* exactly, as doubles */
#ifdef __AVX512F__
    return _mm512_cvtps_pd((__m256)x);  /* one conversion (GCC splits __builtin_convertvector's in two) */
#else
    return __builtin_convertvector(x, d8);
#endif
}

/* 16 float32 or int32 lanes, an AVX-512 register: the products kernel's float32 lanes, where Zen 4 runs
   each 512-bit operation as one instruction of twice the work (fewer instructions in flight for the same work) */
typedef float fw __attribute__((vector_size(64)));
typedef int32_t iw __attribute__((vector_size(64)));
template <int L> struct lanes32;
template <> struct lanes32<8> {
    typedef f8 F;
    typedef i8 I;
    static f8 splat(float v) { return splat32(v); }
};
template <> struct lanes32<16> {
    typedef fw F;
    typedef iw I;
    static fw splat(float v) { return (fw){v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v}; }
};

/* c + a * b rounded once, and the largest of two, in one instruction each where the ISA has it */
static inline f8 fma32(f8 a, f8 b, f8 c) {
#ifdef __FMA__
    return (f8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    for (int l = 0; l < 8; ++l) c[l] = __builtin_fmaf(a[l], b[l], c[l]);
    return c;
#endif
}
static inline fw fma32(fw a, fw b, fw c) {
#ifdef __AVX512F__
    return (fw)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
    for (int l = 0; l < 16; ++l) c[l] = __builtin_fmaf(a[l], b[l], c[l]);
    return c;
#endif
}
static inline i8 max32(i8 a, i8 b) {
#ifdef __AVX2__
    return (i8)_mm256_max_epi32((__m256i)a, (__m256i)b);  /* not a compare and blend */
#else
    return a > b ? a : b;
#endif
}
static inline iw max32(iw a, iw b) {
#ifdef __AVX512F__
    return (iw)_mm512_max_epi32((__m512i)a, (__m512i)b);
#else
    return a > b ? a : b;
#endif
}

/* x's lanes, exactly, as L / 8 vectors of doubles */
static inline void widen_to(d8* out, f8 x) { out[0] = widen8(x); }
static inline void widen_to(d8* out, i8 x) { out[0] = __builtin_convertvector(x, d8); }
template <typename V>
static inline void widen_to(d8* out, V x) {  /* 16 lanes: two halves */
    typedef decltype(x[0] + 0) S;
    typedef S H __attribute__((vector_size(32)));
    H half[2];
    __builtin_memcpy(half, &x, 64);
    widen_to(out, half[0]);
    widen_to(out + 1, half[1]);
}

/* A mul format that float32 holds (rounds_in_float32): its grid in float32, scaled by a power of 2
   (sumi_t's products are counts of the smallest subnormal) */
typedef struct {
    int32_t floor, offset;  /* min_normal's bits; + offset: 2**e's bits to C's, below */
    float max, beyond;  /* beyond: the power of 2 above max */
    int32_t split;  /* C's bits for the binade from which products go to a chunk's high float32 sum (sums32_t) */
    int has_inf, neg_zero;
} grid32_t;

static inline grid32_t grid32(const grid_t* g, double split, float scale) {
    float floor = (float)g->min_normal * scale;
    int32_t bits, man = -ilogb(g->half_scale), offset = ((23 - man) << 23) + 0x400000, high = INT32_MAX;
    __builtin_memcpy(&bits, &floor, 4);
    if (split > 0 && split < INFINITY) {
        float binade = (float)split * scale;
        __builtin_memcpy(&high, &binade, 4);
        high += offset;
    }
    grid32_t m = {bits, offset, (float)g->max * scale, ldexpf(scale, ilogb(g->max) + 1), high, g->has_inf,
                  g->neg_zero};
    return m;
}

template <int L> struct rounded32_t {
    typename lanes32<L>::F r;  /* a product rounded on the grid */
    typename lanes32<L>::I c;  /* the bits of its rounding's C (monotone in its binade) */
};

/* The products of a GEMM and how they are summed: the kernels' parameters past the accumulator's grid */
typedef struct {
    const grid_t* mul;  /* the products' format, rounded to nearest (NULL: exact products) */
    double overflow, acc_overflow;
    int exact;  /* add_rounded's: every add into the accumulator is exact */
    grid32_t mul32;  /* mul's grid where the products are rounded in float32 lanes (rounds_in_float32) */
    float scale;  /* the factor of a where the products are summed as integers (sumi_t), else 1 */
} terms_t;

/* round_product of the exact product x * y of float32 lanes, in float32: the float32 product p gives
   the binade (rounding it cannot cross a midpoint of the grid, and where it rounds up to the next
   binade both grids round to that power of 2), C = 1.5 * 2**23 * u, and fma(x, y, C) rounds the exact
   product on the grid in one step (ties by the exact value), - C exact. Overflow: above max after
   rounding, or p past the binade of max (where C need not be finite). L lanes: 16 for the products
   kernel, 8 for the implicit GEMM's float64 sums. */
template <bool SIGNS, bool OVERFLOW, int L>
static inline rounded32_t<L> round_product32(typename lanes32<L>::F x, typename lanes32<L>::F y,
                                             const grid32_t* m) {
    typedef typename lanes32<L>::F F;
    typedef typename lanes32<L>::I I;
    F p = x * y, c;
    I bits;
    __builtin_memcpy(&bits, &p, sizeof p);
    bits = max32(bits & 0x7F800000, (I){} + m->floor) + m->offset;
    __builtin_memcpy(&c, &bits, sizeof c);
    F r = fma32(x, y, c) - c;
    if (OVERFLOW) {
        I rb, pb;
        __builtin_memcpy(&rb, &r, sizeof r);
        __builtin_memcpy(&pb, &p, sizeof p);
        F ra, pa;
        rb &= INT32_MAX, pb &= INT32_MAX;
        __builtin_memcpy(&ra, &rb, sizeof r);
        __builtin_memcpy(&pa, &pb, sizeof p);
        r = (ra > m->max) | (pa >= m->beyond) ? (m->has_inf ? p * INFINITY : (F){} + NAN) : r;
    }
    if (SIGNS) r = r == 0 ? (m->neg_zero ? p * 0.0f : (F){}) : r;
    rounded32_t<L> t = {r, bits};
    return t;
}

/* A chunk's sum of its products, in order from its first, in float64: L / 8 vectors (float64 products
   come 8 lanes at a time, float32 ones 16) */
template <int L>
struct sum64_t {
    static constexpr int LANES = L;
    static constexpr bool SCALED = false;
    d8 s[L / 8];
    void first(d8 p, const terms_t*) { s[0] = p; }
    void add(d8 p, const terms_t*) { s[0] += p; }
    void first(rounded32_t<L> p, const terms_t*) { widen_to(s, p.r); }
    void add(rounded32_t<L> p, const terms_t*) {
        d8 w[L / 8];
        widen_to(w, p.r);
        for (int h = 0; h < L / 8; ++h) s[h] += w[h];
    }
    void total(d8* out, const terms_t*) const {
        for (int h = 0; h < L / 8; ++h) out[h] = s[h];
    }
};

/* hi += r where c >= split, else lo += r: a compare into a mask and two masked adds */
template <typename F, typename I>
static inline void add_split(F& lo, F& hi, F r, I c, int32_t split) {
    I high = c >= split;
    hi = high ? hi + r : hi;
    lo = high ? lo : lo + r;
}
#ifdef __AVX512F__
static inline void add_split(fw& lo, fw& hi, fw r, iw c, int32_t split) {
    __mmask16 high = _mm512_cmpge_epi32_mask((__m512i)c, _mm512_set1_epi32(split));
    hi = (fw)_mm512_mask_add_ps((__m512)hi, high, (__m512)hi, (__m512)r);
    lo = (fw)_mm512_mask_add_ps((__m512)lo, (__mmask16)~high, (__m512)lo, (__m512)r);
}
#endif

/* The same sum as two float32 sums, of the products below the split binade and of those from it on,
   where both are exact (float32_sums): their float64 sum is then the float64 sum in order, which is exact
   too. Each starts at -0, the identity that keeps a chunk of -0 products at -0. No widening per product:
   it took a third of the kernel's time. */
template <int L>
struct sums32_t {
    static constexpr int LANES = L;
    static constexpr bool SCALED = false;
    typename lanes32<L>::F lo, hi;
    void first(rounded32_t<L> p, const terms_t* t) {
        lo = hi = lanes32<L>::splat(-0.0f);  /* not 0 - 0: that is +0 */
        add(p, t);
    }
    void add(rounded32_t<L> p, const terms_t* t) { add_split(lo, hi, p.r, p.c, t->mul32.split); }
    void total(d8* out, const terms_t*) const {
        d8 l[L / 8];
        widen_to(out, hi);
        widen_to(l, lo);
        for (int h = 0; h < L / 8; ++h) out[h] += l[h];
    }
};

/* The same sum in int32 lanes, of products that round_product32 gives as counts of the format's smallest
   subnormal (a scaled by terms->scale, its inverse): exact where no partial sum can pass 2**31 (integer_sums
   decides), with one conversion per product instead of sums32_t's compare and two masked adds. Its zeros
   are unsigned: only for SIGNS false. */
template <int L>
struct sumi_t {
    static constexpr int LANES = L;
    static constexpr bool SCALED = true;
    typename lanes32<L>::I s;
    void first(rounded32_t<L> p, const terms_t*) { s = __builtin_convertvector(p.r, typename lanes32<L>::I); }
    void add(rounded32_t<L> p, const terms_t*) { s += __builtin_convertvector(p.r, typename lanes32<L>::I); }
    void total(d8* out, const terms_t* t) const {
        widen_to(out, s);
        for (int h = 0; h < L / 8; ++h) out[h] *= 1.0 / t->scale;
    }
};

/* acc[i .. i + k) = round(acc + p), k <= 8 (a short group through a zeroed vector); counts in
   *hits the lanes where p is a zero and acc a -0. */
static inline void fold_group(double* acc, const double* p, int k, const grid_t* g, l8* hits) {
    d8 a = {}, b = {};
    __builtin_memcpy(&a, acc, 8 * k);
    __builtin_memcpy(&b, p, 8 * k);
    d8 s = a + b, bb = s - a;
    d8 e = (a - (s - bb)) + (b - bb);
    l8 bits;
    __builtin_memcpy(&bits, &a, 64);
    *hits -= (b == 0) & (a == 0) & (bits < 0);
    d8 r = round_nearest(s, e, g);
    __builtin_memcpy(acc, &r, 8 * k);
}

/* acc[b][i] = round(acc[b][i] + P[b][j][i]) for chunks j in order, each batch b of n elements.
   Returns how many adds met a zero sum on a -0 accumulator (a GEMM's zero sums are +0, the
   products' may be -0: the caller redoes those). */
extern "C" int64_t fold_chunks(double* acc, const double* partials, int64_t batches, int64_t chunks, int64_t n,
                               const grid_t* g, int threads) {
    int64_t risky = 0, tiles = (n + TILE - 1) / TILE;
#pragma omp parallel for num_threads(threads) if (threads > 1) reduction(+ : risky) schedule(static)
    for (int64_t tile = 0; tile < batches * tiles; ++tile) {
        int64_t batch = tile / tiles, t0 = tile % tiles * TILE;
        int64_t t1 = t0 + TILE < n ? t0 + TILE : n;
        double* acc_b = acc + batch * n;
        l8 hits = {};
        for (int64_t j = 0; j < chunks; ++j) {
            const double* p = partials + (batch * chunks + j) * n;
            int64_t i = t0;
            for (; i + 8 <= t1; i += 8) fold_group(acc_b + i, p + i, 8, g, &hits);
            if (i < t1) fold_group(acc_b + i, p + i, (int)(t1 - i), g, &hits);
        }
        for (int l = 0; l < 8; ++l) risky += hits[l];
    }
    return risky;
}

/* round(a_row[u] * b_cols[u * N + n]) for n < w, through a zeroed vector: b in float64 (exact products
   where t->mul is NULL; 8 lanes), or in float32 (rounded in L float32 lanes, a scaled where SCALED) */
template <bool SIGNS, bool OVERFLOW, bool SCALED, int L>
static inline d8 product(const float* a_row, const double* b_cols, int64_t u, int64_t N, const terms_t* t, int w) {
    d8 y = {};
    __builtin_memcpy(&y, b_cols + u * N, 8 * w);
    d8 p = splat((double)a_row[u]) * y;
    return t->mul ? round_product<SIGNS, OVERFLOW>(p, t->mul, t->overflow) : p;
}

template <bool SIGNS, bool OVERFLOW, bool SCALED, int L>
static inline rounded32_t<L> product(const float* a_row, const float* b_cols, int64_t u, int64_t N,
                                     const terms_t* t, int w) {
    typename lanes32<L>::F y = {};
    __builtin_memcpy(&y, b_cols + u * N, 4 * w);
    return round_product32<SIGNS, OVERFLOW, L>(lanes32<L>::splat(SCALED ? a_row[u] * t->scale : a_row[u]), y,
                                               &t->mul32);
}

/* The products kernel's output: float64, or float32 rounded to nearest where f32 (torch's .to(float32)) */
struct out_t {
    void* p;
    int f32;
    void store(int64_t i, d8 v, int n) const {  /* v's first n lanes to elements i, i + 1, ... */
        if (f32) {
            f8 x = __builtin_convertvector(v, f8);
            __builtin_memcpy((float*)p + i, &x, 4 * n);
        } else {
            __builtin_memcpy((double*)p + i, &v, 8 * n);
        }
    }
};

/* round(acc + part): round_float of the plain sum where every such sum is exact (ops.emulate's
   exact_sums: two_sum's error would be 0), else round_exact of two_sum */
static inline d8 add_rounded(d8 acc, d8 part, const grid_t* g, double acc_overflow, int exact) {
    d8 s = acc + part;
    if (exact) return round_product(s, g, acc_overflow);
    d8 bb = s - acc;
    return round_nearest(s, (acc - (s - bb)) + (part - bb), g);
}

/* out[o[t] + n] for tiles t < T of w columns each (T <= TILES, w <= Sum::LANES): the chunk(k) sum of
   round(a_row[t][u] * b_cols[t][u * N + n]) over u < K, each chunk's rounded products summed in order from
   its first, then added into the accumulator and rounded, chunk by chunk. The tiles' accumulators are
   independent chains: interleaved, one's rounding runs while another's waits on its latency.
   ROW: the tiles are consecutive vectors of one row (a_row[t] = a_row[0], b_cols[t] = b_cols[0] + L t),
   so that a[u] is loaded and broadcast once for all of them. */
template <typename Bt, typename Sum, bool SIGNS, bool OVERFLOW, bool ROW>
static inline void chunk_tiles(out_t out, const int64_t* o, const float* const* a_row, const Bt* const* b_cols,
                               int64_t K, int64_t N, int64_t k, const grid_t* g, const terms_t* terms, int T,
                               int w) {
    constexpr int L = Sum::LANES, H = L / 8;
    d8 acc[TILES][H];
    Sum part[TILES];
    auto ar = [&](int t) { return ROW ? a_row[0] : a_row[t]; };
    auto bc = [&](int t) { return ROW ? b_cols[0] + L * t : b_cols[t]; };
    auto term = [&](int t, int64_t u) { return product<SIGNS, OVERFLOW, Sum::SCALED, L>(ar(t), bc(t), u, N, terms, w); };
    for (int t = 0; t < T; ++t)
        for (int h = 0; h < H; ++h) acc[t][h] = splat(0.0);
    for (int64_t u0 = 0; u0 < K; u0 += k) {
        int64_t u1 = u0 + k < K ? u0 + k : K;
        for (int t = 0; t < T; ++t) part[t].first(term(t, u0), terms);
        for (int64_t u = u0 + 1; u < u1; ++u)
            for (int t = 0; t < T; ++t) part[t].add(term(t, u), terms);
        for (int t = 0; t < T; ++t) {
            d8 sum[H];
            part[t].total(sum, terms);
            for (int h = 0; h < H; ++h) acc[t][h] = add_rounded(acc[t][h], sum[h], g, terms->acc_overflow, terms->exact);
        }
    }
    for (int t = 0; t < T; ++t)
        for (int h = 0; h < H && 8 * h < w; ++h) out.store(o[t] + 8 * h, acc[t][h], w - 8 * h < 8 ? w - 8 * h : 8);
}

/* chunk_tiles of exact products (no mul format) over R rows of a times all C vectors of a row
   (R * C = TILES, N = 8 C): each b vector is loaded once for the R rows, each a value converted
   once for the C vectors (the same arithmetic, in the same order, lane by lane). */
template <int R, int C>
static void exact_rows(out_t out, const float* a, const double* b, int64_t rows, int64_t M, int64_t K,
                       int64_t k, const grid_t* g, double acc_overflow, int exact, int threads) {
    const int64_t N = 8 * C;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += R) {
        const float* ar = a + r0 * K;
        const double* bc = b + r0 / M * K * N;
        d8 acc[R][C], part[R][C], y[C];
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) acc[r][c] = splat(0.0);
        for (int64_t u0 = 0; u0 < K; u0 += k) {
            int64_t u1 = u0 + k < K ? u0 + k : K;
            for (int c = 0; c < C; ++c) __builtin_memcpy(&y[c], bc + u0 * N + 8 * c, 64);
            for (int r = 0; r < R; ++r) {
                d8 x = splat((double)ar[r * K + u0]);
                for (int c = 0; c < C; ++c) part[r][c] = x * y[c];
            }
            for (int64_t u = u0 + 1; u < u1; ++u) {
                for (int c = 0; c < C; ++c) __builtin_memcpy(&y[c], bc + u * N + 8 * c, 64);
                for (int r = 0; r < R; ++r) {
                    d8 x = splat((double)ar[r * K + u]);
                    for (int c = 0; c < C; ++c) part[r][c] += x * y[c];
                }
            }
            for (int r = 0; r < R; ++r)
                for (int c = 0; c < C; ++c) acc[r][c] = add_rounded(acc[r][c], part[r][c], g, acc_overflow, exact);
        }
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) out.store((r0 + r) * N + 8 * c, acc[r][c], 8);
    }
}

/* out[b][i][n] = chunk_tiles of row i of a[b] and column n of b[b]: the whole vectors of L = Sum::LANES
   output columns, in row-major order, TILES * 8 columns to a task (a task may span rows: a tall, narrow GEMM
   has few vectors to a row); then each row's short last vector on its own. 16 float32 lanes of 4 vectors
   ran the 256^3 chunk(32) GEMM a quarter faster than 8 of 8; 8 of 16 spilled the accumulators. */
template <typename Bt, typename Sum, bool SIGNS, bool OVERFLOW>
static void gemm(out_t out, const float* a, const Bt* b, int64_t batches, int64_t M, int64_t K, int64_t N,
                 int64_t k, const grid_t* g, const terms_t* terms, int threads) {
    constexpr int L = Sum::LANES, V = TILES * 8 / L;  /* vectors to a task: TILES * 8 columns */
    int64_t per_row = N / L, whole = batches * M * per_row, tails = N % L ? batches * M : 0;
    int64_t blocks = (whole + V - 1) / V;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t task = 0; task < blocks + tails; ++task) {
        int64_t o[V];
        const float* ar[V];
        const Bt* bc[V];
        int T = 0, w = L;
        auto take = [&](int64_t row, int64_t n0) {  /* the vector at column n0 of row: tile T */
            o[T] = row * N + n0, ar[T] = a + row * K, bc[T] = b + row / M * K * N + n0;
            ++T;
        };
        for (int64_t v = task * V; task < blocks && v < whole && T < V; ++v) take(v / per_row, v % per_row * L);
        if (task >= blocks) {  /* a row's short last vector */
            take(task - blocks, per_row * L);
            w = (int)(N - per_row * L);
        }
        if (T == V && ar[V - 1] == ar[0] && bc[V - 1] == bc[0] + L * (V - 1))
            chunk_tiles<Bt, Sum, SIGNS, OVERFLOW, true>(out, o, ar, bc, K, N, k, g, terms, V, L);
        else if (T == V)
            chunk_tiles<Bt, Sum, SIGNS, OVERFLOW, false>(out, o, ar, bc, K, N, k, g, terms, V, L);
        else
            chunk_tiles<Bt, Sum, SIGNS, OVERFLOW, false>(out, o, ar, bc, K, N, k, g, terms, T, w);
    }
}

template <typename Bt, typename Sum>
static void gemm_of(out_t out, const float* a, const Bt* b, int64_t batches, int64_t M, int64_t K, int64_t N,
                    int64_t k, const grid_t* g, const terms_t* terms, int signs, int overflows, int threads) {
    auto run = signs ? (overflows ? gemm<Bt, Sum, true, true> : gemm<Bt, Sum, true, false>)
                     : (overflows ? gemm<Bt, Sum, false, true> : gemm<Bt, Sum, false, false>);
    run(out, a, b, batches, M, K, N, k, g, terms, threads);
}

/* gemm into result (float32 where out32, else float64), its products' zeros signed or not (signs), their
   overflow handled or not (overflow); b float32 (b32: mul rounds in float32; scale > 0: each chunk summed
   as sumi_t, a scaled by it, where neither signs nor overflows; else split > 0: as sums32_t from that
   binade, inf: one sum) or float64 */
extern "C" void chunk_products(void* result, int out32, const float* a, const void* b, int b32, double split,
                               float scale, int64_t batches, int64_t M, int64_t K, int64_t N, int64_t k,
                               const grid_t* mul, double overflow, const grid_t* g, double acc_overflow, int exact,
                               int signs, int overflows, int threads) {
    out_t out = {result, out32};
    terms_t t = {mul, overflow, acc_overflow, exact, {}, scale > 0 ? scale : 1.0f};
    if (b32) {
        t.mul32 = grid32(mul, split, t.scale);
        if (scale > 0)
            return gemm<float, sumi_t<16>, false, false>(out, a, (const float*)b, batches, M, K, N, k, g, &t, threads);
        auto run = split > 0 ? gemm_of<float, sums32_t<16>> : gemm_of<float, sum64_t<16>>;
        return run(out, a, (const float*)b, batches, M, K, N, k, g, &t, signs, overflows, threads);
    }
    const double* b64 = (const double*)b;
    if (!mul && (N == 8 || N == 16 || N == 32) && M % (8 * TILES / N) == 0) {  /* narrow exact GEMMs */
        auto rows = N == 8 ? exact_rows<TILES, 1> : N == 16 ? exact_rows<TILES / 2, 2> : exact_rows<TILES / 4, 4>;
        return rows(out, a, b64, batches * M, M, K, k, g, acc_overflow, exact, threads);
    }
    gemm_of<double, sum64_t<8>>(out, a, b64, batches, M, K, N, k, g, &t, signs, overflows, threads);
}

static inline d8 widen(const float* x) {  /* 8 floats from x, exactly as doubles */
    f8 y;
    __builtin_memcpy(&y, x, 32);
    return widen8(y);
}

/* A step's vectors and scalars in the lanes its products are formed in: float64, or float32 where the
   scalars are float32 (the products then rounded by round_product32) */
template <typename St> struct step_lanes;
template <> struct step_lanes<double> {
    typedef d8 V;
    static d8 vec(const float* x) { return widen(x); }
    static d8 scalar(double s) { return splat(s); }
};
template <> struct step_lanes<float> {
    typedef f8 V;
    static f8 vec(const float* x) {
        f8 y;
        __builtin_memcpy(&y, x, 32);
        return y;
    }
    static f8 scalar(float s) { return splat32(s); }
};

/* round(v * s) where MUL, else the exact v * s (float32 factors) */
template <bool MUL, bool SIGNS, bool OVERFLOW>
static inline d8 term(d8 v, d8 s, const terms_t* t) {
    return MUL ? round_product<SIGNS, OVERFLOW>(v * s, t->mul, t->overflow) : v * s;
}

template <bool MUL, bool SIGNS, bool OVERFLOW>
static inline d8 term(f8 v, f8 s, const terms_t* t) {
    return widen8(round_product32<SIGNS, OVERFLOW, 8>(v, s, &t->mul32).r);
}

/* The R x P tile of offset_gemm over reduction steps [t0, t1) (t0 a multiple of k): acc[r][p]
   (8 lanes, in memory: touched once a chunk) takes the chunk sums of the terms of V[vb[p] + voff[t] + l]
   and S[sb[r] + soff[t]], each chunk's terms summed in order from its first, as chunk_tiles sums them
   (an exact product added by one fused multiply-add: the same sum). */
template <int R, int P, typename St, bool MUL, bool SIGNS, bool OVERFLOW>
static void offset_tile(double* acc, const float* V, const St* S, const int64_t* voff, const int64_t* soff,
                        int64_t t0, int64_t t1, int64_t k, const int64_t* vb, const int64_t* sb, const grid_t* g,
                        const terms_t* t) {
    typedef step_lanes<St> L;
    d8 part[R][P];
    typename L::V v[P];
    for (int64_t u0 = t0; u0 < t1; u0 += k) {
        int64_t u1 = u0 + k < t1 ? u0 + k : t1;
        for (int p = 0; p < P; ++p) v[p] = L::vec(V + vb[p] + voff[u0]);
        for (int r = 0; r < R; ++r) {
            typename L::V s = L::scalar(S[sb[r] + soff[u0]]);
            for (int p = 0; p < P; ++p) part[r][p] = term<MUL, SIGNS, OVERFLOW>(v[p], s, t);
        }
        for (int64_t u = u0 + 1; u < u1; ++u) {
            for (int p = 0; p < P; ++p) v[p] = L::vec(V + vb[p] + voff[u]);
            for (int r = 0; r < R; ++r) {
                typename L::V s = L::scalar(S[sb[r] + soff[u]]);
                for (int p = 0; p < P; ++p) {
                    if constexpr (MUL)
                        part[r][p] += term<MUL, SIGNS, OVERFLOW>(v[p], s, t);
                    else
                        part[r][p] = fma8(v[p], s, part[r][p]);
                }
            }
        }
        for (int r = 0; r < R; ++r)
            for (int p = 0; p < P; ++p) {
                d8 a;
                __builtin_memcpy(&a, acc + (r * P + p) * 8, 64);
                a = add_rounded(a, part[r][p], g, t->acc_overflow, t->exact);
                __builtin_memcpy(acc + (r * P + p) * 8, &a, 64);
            }
    }
}

template <int R, int P, typename St, bool MUL, bool SIGNS, bool OVERFLOW>
static void offset_run(double* out, const float* V, const St* S, const int64_t* voff, const int64_t* soff,
                       int64_t T, int64_t k, const int64_t* vbase, const int64_t* obase, const int64_t* width,
                       int64_t nv, const int64_t* sbase, const int64_t* orow, int64_t ns, int64_t block,
                       const grid_t* g, const terms_t* t, int threads) {
    int64_t row_tiles = (ns + R - 1) / R, tasks = (nv + P - 1) / P * row_tiles;
    double* held = T > block ? (double*)calloc(tasks * R * P * 8, sizeof(double)) : NULL;
#pragma omp parallel num_threads(threads) if (threads > 1)
    for (int64_t t0 = 0; t0 < T; t0 += block) {
        int64_t t1 = t0 + block < T ? t0 + block : T;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; ++task) {
            int64_t v0 = task / row_tiles * P, s0 = task % row_tiles * R, vb[P], sb[R];
            double local[R * P * 8] = {};
            double* acc = held ? held + task * R * P * 8 : local;
            for (int p = 0; p < P; ++p) vb[p] = vbase[v0 + p < nv ? v0 + p : v0];  /* a short tile repeats */
            for (int r = 0; r < R; ++r) sb[r] = sbase[s0 + r < ns ? s0 + r : s0];  /* its first vector/row */
            offset_tile<R, P, St, MUL, SIGNS, OVERFLOW>(acc, V, S, voff, soff, t0, t1, k, vb, sb, g, t);
            if (t1 < T) continue;
            for (int r = 0; r < R && s0 + r < ns; ++r)
                for (int p = 0; p < P && v0 + p < nv; ++p)
                    __builtin_memcpy(out + obase[v0 + p] + orow[s0 + r], acc + (r * P + p) * 8, 8 * width[v0 + p]);
        }
    }
    free(held);
}

template <typename St>
using offset_run_t = void (*)(double*, const float*, const St*, const int64_t*, const int64_t*, int64_t, int64_t,
                              const int64_t*, const int64_t*, const int64_t*, int64_t, const int64_t*, const int64_t*,
                              int64_t, int64_t, const grid_t*, const terms_t*, int);

template <typename St, bool MUL, bool SIGNS, bool OVERFLOW>
static offset_run_t<St> offset_shape(int shape) {
    return shape == 0   ? offset_run<24, 1, St, MUL, SIGNS, OVERFLOW>
           : shape == 1 ? offset_run<12, 2, St, MUL, SIGNS, OVERFLOW>
           : shape == 2 ? offset_run<8, 3, St, MUL, SIGNS, OVERFLOW>
                        : offset_run<6, 4, St, MUL, SIGNS, OVERFLOW>;
}

template <typename St, bool MUL>
static offset_run_t<St> offset_variant(int shape, int signs, int overflows) {
    if (signs)
        return overflows ? offset_shape<St, MUL, true, true>(shape) : offset_shape<St, MUL, true, false>(shape);
    return overflows ? offset_shape<St, MUL, false, true>(shape) : offset_shape<St, MUL, false, false>(shape);
}

/* out[obase[i] + orow[j] + l] for l < width[i] = the chunk(k) GEMM (each product rounded to nearest on
   mul where there is one, each chunk summed in order from its first term, then added into the
   accumulator and rounded to nearest) of the vectors V[vbase[i] + voff[t] + l] and the scalars
   S[sbase[j] + soff[t]] over steps t < T: a GEMM whose operands are read where offset tables say (a
   convolution without patches). Vector lanes past width[i] are read (V holds 8 elements past its last)
   and dropped. Tiles of `shape` (R x P), each over `block` steps (a multiple of k) at a time, so that
   every tile meets the same block while it is in cache. S is float32 (s32) where mul rounds in float32,
   else float64. signs, overflows: as chunk_products's. */
extern "C" void offset_gemm(double* out, const float* V, const void* S, int s32, const int64_t* voff,
                            const int64_t* soff, int64_t T, int64_t k, const int64_t* vbase, const int64_t* obase,
                            const int64_t* width, int64_t nv, const int64_t* sbase, const int64_t* orow, int64_t ns,
                            int shape, int64_t block, const grid_t* g, double acc_overflow, const grid_t* mul,
                            double overflow, int exact, int signs, int overflows, int threads) {
    terms_t t = {mul, overflow, acc_overflow, exact, {}, 1.0f};
    if (s32) {
        t.mul32 = grid32(mul, 0.0, 1.0f);
        return offset_variant<float, true>(shape, signs, overflows)(out, V, (const float*)S, voff, soff, T, k, vbase,
                                                                     obase, width, nv, sbase, orow, ns, block, g, &t,
                                                                     threads);
    }
    auto run = mul ? offset_variant<double, true>(shape, signs, overflows)
                   : offset_shape<double, false, false, false>(shape);
    run(out, V, (const double*)S, voff, soff, T, k, vbase, obase, width, nv, sbase, orow, ns, block, g, &t, threads);
}
"""


class _Grid(ctypes.Structure):
    _fields_ = [(name, ctypes.c_double) for name in ("qmin", "max", "min_normal", "split", "big", "magic_qmin",
                                                      "half_scale")] + [("has_inf", ctypes.c_int),
                                                                        ("neg_zero", ctypes.c_int)]


@functools.lru_cache(maxsize=None)
def load_kernel() -> ctypes.CDLL:
    """The compiled library (compiled on the first call, then from inductor's disk cache)."""
    lib = compile_library(f"#define TILE {_TILE}\n#define TILES {_TILES}\n" + _SOURCE)
    lib.fold_chunks.restype = ctypes.c_int64
    lib.fold_chunks.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                ctypes.POINTER(_Grid), ctypes.c_int]
    lib.chunk_products.restype = None
    lib.chunk_products.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                   ctypes.c_double, ctypes.c_float] + [ctypes.c_int64] * 5 + [
        ctypes.POINTER(_Grid), ctypes.c_double, ctypes.POINTER(_Grid), ctypes.c_double] + [ctypes.c_int] * 4
    lib.offset_gemm.restype = None
    lib.offset_gemm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [
        ctypes.c_void_p] * 3 + [
        ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.POINTER(_Grid),
                                                   ctypes.c_double, ctypes.POINTER(_Grid), ctypes.c_double] + [
        ctypes.c_int] * 4
    return lib


def takes_grid(grid: Grid) -> bool:
    """Whether the kernel rounds to ``grid``'s format (``round_float``'s fast path serves it)."""
    return grid.fallback is None


@functools.lru_cache(maxsize=64)
def _grid_struct(grid: Grid) -> _Grid:
    return _Grid(grid.qmin, grid.max, grid.min_normal, grid.split, grid.big, grid.qmin * 1.5 * 2.0**52,
                 2.0**-grid.man, int(grid.has_inf), int(grid.neg_zero))


def fold_chunks_(acc: torch.Tensor, partials: torch.Tensor, grid: Grid) -> int:
    """``acc[b] = round(acc[b] + partials[b, j])`` to nearest on ``grid``, for each j in order, in place.

    Args:
        acc: float64, contiguous, (B, ...).
        partials: float64, contiguous, (B, chunks, ...) with ``acc[b]``'s shape after the chunks.
        grid: the accumulator format's ``Grid`` (``takes_grid``).

    Returns:
        How many adds met an exact zero chunk sum on a -0 accumulator, where IEEE's sum of
        the products could be -0 and the GEMM's is +0: the caller redoes the GEMM if any.
    """
    if not takes_grid(grid):
        raise ValueError("fold_chunks_: the grid's format needs the reference rounding (no subnormals, zero or sign)")
    batches, chunks = partials.shape[:2]
    n = acc[0].numel() if batches else 0
    require_cpu("fold_chunks_: acc", acc, (torch.float64,), batches * n)
    require_cpu("fold_chunks_: partials", partials, (torch.float64,), batches * chunks * n)
    if acc.shape[0] != batches or partials.shape[2:] != acc.shape[1:]:
        raise ValueError(f"fold_chunks_: partials {tuple(partials.shape)} are not (batches, chunks) of acc's "
                         f"{tuple(acc.shape[1:])} for acc {tuple(acc.shape)}")
    if n == 0 or chunks == 0:
        return 0
    return load_kernel().fold_chunks(acc.data_ptr(), partials.data_ptr(), batches, chunks, n,
                                     ctypes.byref(_grid_struct(grid)), threads_for(batches * chunks * n))


@functools.lru_cache(maxsize=64)
def rounds_in_float32(grid: Grid) -> bool:
    """Whether the kernel rounds products of float32 factors to ``grid``'s format in float32 lanes
    (``round_product32``): its precision and range leave the rounding's constant C = 1.5 * 2**23 * u
    finite and normal up to the binade of max (bf16's does not), and min_normal is float32's normal."""
    emax = math.floor(math.log2(grid.max))
    return takes_grid(grid) and grid.man <= 20 and grid.min_normal >= 2.0**-126 and 23 + emax - grid.man <= 126


@functools.lru_cache(maxsize=256)
def float32_sums(mul: Grid, k: int) -> float | None:
    """Where a chunk of k products rounded in float32 (``rounds_in_float32``) is summed in float32:
    the binade from which products go to the higher of two float32 sums (inf: one sum holds all),
    such that both sums are exact and so is the float64 sum in order that they stand for (every
    product is a multiple of the format's smallest subnormal); None: each product is widened to
    float64 and summed there, as also for chunks of fewer than ``_FLOAT32_SUMS_FROM`` products (the
    two sums' widening at the chunk's end would cost more than it saves).

    A sum of k products from binades [lo, hi] of a format with man fraction bits counts at most
    k * 2**(hi + 1 - lo + man) quanta of binade lo; float32 holds 2**24 of them exactly, float64 2**53.
    """
    if k < _FLOAT32_SUMS_FROM:
        return None
    lo, hi = round(math.log2(mul.min_normal)), math.floor(math.log2(mul.max))
    binades, bits = hi + 1 - lo, math.ceil(math.log2(k))
    per_sum = 24 - mul.man - bits  # binades whose sum float32 holds exactly
    if binades + mul.man + bits > 53 or 2 * per_sum < binades:
        return None
    return math.inf if per_sum >= binades else 2.0 ** (lo + per_sum)


def integer_sums(mul: Grid, k: int, largest: tuple[float, float]) -> float | None:
    """The factor by which a is scaled where a chunk of k products rounded in float32
    (``rounds_in_float32``) is summed in int32 lanes, as counts of ``mul``'s smallest subnormal
    (``sumi_t``; the factor is its inverse, a power of 2); None where it is not.

    One conversion per product replaces ``float32_sums``' two sums (a compare and two masked adds)
    where that takes two float32 sums or none; it serves where no partial sum can reach 2**31
    counts, by the operands' largest magnitudes ``largest`` (max|a|, max|b|; NaN: unknown), and
    the scaled a stays finite in float32. Its zeros are unsigned: the caller uses it only where
    the sign of a zero product cannot matter.
    """
    if k < _FLOAT32_SUMS_FROM or float32_sums(mul, k) == math.inf:
        return None
    a_max, b_max = largest
    scale = 1.0 / mul.qmin
    rounded = a_max * b_max * (1 + 2.0**-mul.man) + mul.qmin  # above every product's rounded magnitude
    return scale if k * rounded * scale < _INT32_COUNTS and a_max * scale < 2.0**128 else None  # NaN: None


def chunk_products_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int, mul: Grid | None,
                    grid: Grid, exact_sums: bool = False, signed_zeros: bool = True,
                    largest: tuple[float, float] = (math.inf, math.inf)) -> None:
    """``acc`` = the ``chunk(k)`` GEMM ``a @ b`` with each product rounded to nearest on ``mul``
    and each chunk's sum rounded into the accumulator to nearest on ``grid`` (module docstring).

    Args:
        acc: float64, contiguous, (B, M, N); overwritten. Or float32: the float64 result rounded to
            nearest, as ``.to(torch.float32)`` would (without its float64 copy).
        a, b: float32, contiguous, (B, M, K) and (B, K, N). Where ``mul`` rounds in float32
            (``rounds_in_float32``) the kernel reads b as it is, else b is converted to float64
            once here (converting it in the kernel, once per row that reads it, is a quarter slower).
        k: the chunk length (1: sequential order).
        mul, grid: the ``Grid`` of the product and accumulator formats (``takes_grid``); mul
            None: the products are exact.
        exact_sums: every add into the accumulator is exact in float64 (``ops.emulate``'s
            ``_sums_are_exact``), so it is rounded without two_sum's error term (which is 0).
        signed_zeros: as ``ops.exact.round_float``'s, for the products: False where the sign of a
            zero product cannot matter.
        largest: the largest magnitudes of a and of b (NaN where one is NaN; inf: not known), whose
            product bounds the products': where it rounds below ``mul``'s overflow threshold
            no product is checked for overflow, and it decides ``integer_sums``.
    """
    if not ((mul is None or takes_grid(mul)) and takes_grid(grid)):
        raise ValueError("chunk_products_: a grid's format needs the reference rounding (no subnormals, zero or sign)")
    B, M, K = a.shape
    N = b.shape[-1]
    require_cpu("chunk_products_: acc", acc, (torch.float64, torch.float32), B * M * N)
    require_cpu("chunk_products_: a", a, (torch.float32,))
    require_cpu("chunk_products_: b", b, (torch.float32,), B * K * N)
    if k < 1:
        raise ValueError(f"chunk_products_: chunk length {k} must be positive")
    if not acc.numel():
        return
    overflow = mul is not None and not largest[0] * largest[1] < mul.overflow  # exact for float32 operands
    b32 = mul is not None and rounds_in_float32(mul)
    scale = integer_sums(mul, k, largest) if b32 and not (signed_zeros or overflow) else None
    split = (float32_sums(mul, k) or 0.0) if b32 and scale is None else 0.0
    b = b if b32 else b.to(torch.float64)
    load_kernel().chunk_products(acc.data_ptr(), int(acc.dtype == torch.float32), a.data_ptr(), b.data_ptr(),
                                 int(b32), split, scale or 0.0, B, M, K, N, k,
                                 None if mul is None else ctypes.byref(_grid_struct(mul)),
                                 0.0 if mul is None else mul.overflow, ctypes.byref(_grid_struct(grid)),
                                 grid.overflow, int(exact_sums), int(signed_zeros), int(overflow),
                                 threads_for(B * M * N * K // 8))


def offset_gemm_(out: torch.Tensor, v: torch.Tensor, s: torch.Tensor, v_steps: torch.Tensor, s_steps: torch.Tensor,
                 vectors: torch.Tensor, rows: torch.Tensor, k: int, grid: Grid, mul: Grid | None = None,
                 exact_sums: bool = False, signed_zeros: bool = True, overflow: bool = True) -> None:
    """The ``chunk(k)`` GEMM of products formed one by one, its operands read at offsets
    (``offset_gemm`` in the source): ``out[o_i + o_j + l] = sum over t of v[v_i + v_steps[t] + l] *
    s[s_j + s_steps[t]]`` for lanes ``l < w_i``, each product rounded to nearest on ``mul`` (exact
    where None), chunks of k steps each summed in order, then rounded into the accumulator to
    nearest on ``grid``: ``chunk_products_``'s sums.

    Args:
        out: float64, contiguous; the elements named are overwritten.
        v: float32, contiguous, with 8 elements past the last one a vector reads.
        s: float32 or float64, contiguous. float32 where ``mul`` rounds in float32
            (``rounds_in_float32``): the products are formed and rounded in float32 lanes; a
            float32 s is converted to float64 (a copy) for other specs.
        v_steps, s_steps: int64 (T,): each step's offset into v and into s.
        vectors: int64 (nv, 3): each output vector's (v_i, o_i, w_i), w_i <= 8 lanes.
        rows: int64 (ns, 2): each row's (s_j, o_j).
        k: the chunk length (1: sequential order).
        grid, mul: the ``Grid`` of the accumulator and product formats (``takes_grid``).
        exact_sums, signed_zeros: as ``chunk_products_``'s.
        overflow: whether a product may round past ``mul``'s max (``ops.emulate.products_overflow``);
            False: none is checked.
    """
    if not ((mul is None or takes_grid(mul)) and takes_grid(grid)):
        raise ValueError("offset_gemm_: a grid's format needs the reference rounding (no subnormals, zero or sign)")
    for name, t, dtypes in (("out", out, (torch.float64,)), ("v", v, (torch.float32,)),
                            ("s", s, (torch.float32, torch.float64)), ("v_steps", v_steps, (torch.int64,)),
                            ("s_steps", s_steps, (torch.int64,))):
        require_cpu(f"offset_gemm_: {name}", t, dtypes)
    steps, nv, ns = v_steps.numel(), vectors.shape[0], rows.shape[0]
    if k < 1 or s_steps.numel() != steps:
        raise ValueError(f"offset_gemm_: {steps} v steps, {s_steps.numel()} s steps, chunk {k}: the step tables "
                         f"must match and k be positive")
    if steps == 0 or nv == 0 or ns == 0:
        if steps == 0:
            out.zero_()  # empty sums are +0; out is the whole result (every element a vector's lane)
        return
    s32 = s.dtype == torch.float32 and mul is not None and rounds_in_float32(mul)
    s = s if s32 else s.to(torch.float64)
    cols = [c.contiguous() for c in (*vectors.unbind(1), *rows.unbind(1))]
    shape = min(range(len(_SHAPES)), key=lambda i: (-(-nv // _SHAPES[i][1]) * _SHAPES[i][1]
                                                     * -(-ns // _SHAPES[i][0]) * _SHAPES[i][0], i))
    load_kernel().offset_gemm(out.data_ptr(), v.data_ptr(), s.data_ptr(), int(s32), v_steps.data_ptr(),
                              s_steps.data_ptr(), steps, k, cols[0].data_ptr(), cols[1].data_ptr(),
                              cols[2].data_ptr(), nv, cols[3].data_ptr(), cols[4].data_ptr(), ns, shape,
                              max(k, _BLOCK_STEPS // k * k),
                              ctypes.byref(_grid_struct(grid)), grid.overflow,
                              None if mul is None else ctypes.byref(_grid_struct(mul)),
                              0.0 if mul is None else mul.overflow, int(exact_sums), int(signed_zeros), int(overflow),
                              threads_for(nv * ns * steps))


register_chunk_fold(ChunkFold(fold_chunks_, chunk_products_,
                              lambda grid: takes_grid(grid) and load_kernel() is not None, offset_gemm_))
