"""The sequential rounding of an emulated ``chunk(k)`` GEMM's chunk sums, in C++ (CPU).

``chunk(k)`` accumulation adds each chunk's exact sum of products into the accumulator and
rounds: ``acc = round(acc + P_j)`` for j = 0, 1, ... in order. The chunk sums P come from one
float64 GEMM over all chunks; what is left is this fold, which in torch is some twenty
operations per chunk, each a pass over the output (and a Python loop over the chunks). Here it
is one pass: a tile of the accumulator stays in L1 while every chunk's sums stream through it.
Each step is ``ops.exact.round_exact`` of ``two_sum(acc, P_j)`` to nearest, operation for
operation (``-ffp-contract=off``: nothing fuses), so the result is bit-identical to the torch
fold. Compiled once by inductor's C++ toolchain (``cpu_kernels.compile_library``); where that
fails the caller folds in torch. A plug-in of the torch backend: ``backends.load_plugins``
imports it, and it registers itself with ``ops.emulate.register_chunk_fold``.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from ..ops.emulate import ChunkFold, register_chunk_fold
from ..ops.exact import Grid
from .cpu_kernels import compile_library, require_cpu, threads_for

__all__ = ["load_kernel", "takes_grid", "fold_chunks_"]

_TILE = 512  # accumulator elements a thread keeps in L1 while the chunks stream through

_SOURCE = r"""
#include <omp.h>
typedef double d8 __attribute__((vector_size(64)));
typedef int64_t l8 __attribute__((vector_size(64)));
typedef struct {
    double qmin, max, min_normal, split, big, magic_qmin, half_scale;
    int has_inf, neg_zero;
} grid_t;

static inline d8 splat(double v) { return (d8){} + v; }
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
"""


class _Grid(ctypes.Structure):
    _fields_ = [(name, ctypes.c_double) for name in ("qmin", "max", "min_normal", "split", "big", "magic_qmin",
                                                      "half_scale")] + [("has_inf", ctypes.c_int),
                                                                        ("neg_zero", ctypes.c_int)]


@functools.lru_cache(maxsize=None)
def load_kernel() -> ctypes.CDLL:
    """The compiled library (compiled on the first call, then from inductor's disk cache)."""
    lib = compile_library(f"#define TILE {_TILE}\n" + _SOURCE)
    lib.fold_chunks.restype = ctypes.c_int64
    lib.fold_chunks.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                ctypes.POINTER(_Grid), ctypes.c_int]
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


register_chunk_fold(ChunkFold(fold_chunks_, lambda grid: takes_grid(grid) and load_kernel() is not None))
