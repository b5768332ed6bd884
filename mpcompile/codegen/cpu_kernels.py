"""What the fused C++ CPU kernels share (``blockwise_adam_cpu``, ``comm_hook_cpu``): GCC's
eight-lane vector types, a run's extremes, and compiling a source with inductor's C++ toolchain.

Inductor compiles CPU kernels with ``-O3 -march=native -ffp-contract=off`` and auto-vectorisation
off; the prelude turns vectorisation back on for these loops. ``-ffp-contract=off`` matters: a
kernel that must equal torch's arithmetic writes each fused multiply-add itself.
"""
from __future__ import annotations

import ctypes

import torch

__all__ = ["PRELUDE", "PARALLEL_FROM", "compile_library", "threads_for", "require_cpu"]

PARALLEL_FROM = 1 << 14  # elements from which a call splits its blocks among torch's threads (OpenMP)

PRELUDE = r"""
#pragma GCC optimize("tree-loop-vectorize")
#include <math.h>
#include <stdint.h>

typedef float f8 __attribute__((vector_size(32)));
typedef uint32_t u8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint8_t b8 __attribute__((vector_size(8)));

/* The largest and smallest of x[0 .. n) into *hi and *lo; whether one is NaN. In eight lanes, so
   that no compare waits for the one before. */
static inline int extremes(const float* x, int64_t n, float* hi, float* lo) {
    f8 h8 = (f8){} - INFINITY, l8 = (f8){} + INFINITY;
    i8 nan8 = {};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        f8 y;
        __builtin_memcpy(&y, x + i, 32);
        nan8 |= y != y;
        h8 = y > h8 ? y : h8;
        l8 = y < l8 ? y : l8;
    }
    float h = -INFINITY, l = INFINITY;
    int nan = 0;
    for (int k = 0; k < 8; ++k) {
        nan |= nan8[k];
        h = h8[k] > h ? h8[k] : h;
        l = l8[k] < l ? l8[k] : l;
    }
    for (; i < n; ++i) {
        nan |= x[i] != x[i];
        h = x[i] > h ? x[i] : h;
        l = x[i] < l ? x[i] : l;
    }
    *hi = h;
    *lo = l;
    return nan;
}
"""


def compile_library(source: str) -> ctypes.CDLL:
    """``PRELUDE + source`` compiled and loaded (inductor caches it on disk by its text)."""
    from torch._inductor.codecache import CppCodeCache  # inductor loads only where a kernel runs
    return CppCodeCache.load(PRELUDE + source)


def threads_for(numel: int) -> int:
    """The threads a kernel call over ``numel`` elements takes: torch's, from ``PARALLEL_FROM`` on."""
    return torch.get_num_threads() if numel >= PARALLEL_FROM else 1


def require_cpu(what: str, tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...], numel: int | None = None) -> None:
    """The kernels read raw pointers: a tensor of another dtype, size or layout is refused.

    Raises:
        ValueError: naming ``what``, unless ``tensor`` is contiguous, on the CPU, of one of
            ``dtypes`` and (where given) of ``numel`` elements.
    """
    if not (tensor.dtype in dtypes and tensor.is_contiguous() and tensor.device.type == "cpu"
            and (numel is None or tensor.numel() == numel)):
        size = "" if numel is None else f"{numel} "
        raise ValueError(f"{what} must be {size}contiguous CPU elements of {', '.join(map(str, dtypes))}; got "
                         f"{tensor.numel()} of {tensor.dtype} on {tensor.device}")
