"""A 2-D convolution's patches as a GEMM operand, in C++ (CPU): im2col into (N*Ho*Wo, C*kh*kw).

``ops.im2col.conv_as_gemm_operands`` lays the unfolded input out as a matrix whose rows are
the output positions (n, oh, ow) and whose columns are (c, i, j) in that order. torch does it as
a copy of a 6-D strided view whose innermost run is the kernel width (3 elements), at 2-3 ns an
element; here each row is written in order, each run of kw elements read from the (padded)
input row, at memory speed. The values are copied, so the result equals torch's bit for bit.
Compiled once by inductor's C++ toolchain (``cpu_kernels.compile_library``); where that fails
the caller copies with torch. A plug-in of the torch backend: ``backends.load_plugins`` imports
it, and it registers itself with ``ops.im2col.register_patch_rows``.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from ..ops.im2col import output_sizes, phased_size, register_patch_rows, register_phased_rows
from .cpu_kernels import compile_library, require_cpu, threads_for

__all__ = ["DTYPES", "load_kernel", "patch_rows", "phased_rows"]

DTYPES = {torch.float32: 0, torch.float64: 1}

_SOURCE = r"""
#include <omp.h>
#include <string.h>
template <typename T>
static void rows(const T* x, T* out, int64_t n, int64_t c, int64_t h, int64_t w, int64_t kh, int64_t kw,
                 int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t ho, int64_t wo,
                 int threads) {
    int64_t k = c * kh * kw;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t row = 0; row < n * ho * wo; ++row) {
        int64_t b = row / (ho * wo), oh = row / wo % ho, ow = row % wo;
        T* dst = out + row * k;
        for (int64_t ch = 0; ch < c; ++ch) {
            const T* plane = x + (b * c + ch) * h * w;
            for (int64_t i = 0; i < kh; ++i, dst += kw) {
                int64_t y = oh * sh - ph + i * dh;
                if (y < 0 || y >= h) {
                    memset(dst, 0, kw * sizeof(T));
                    continue;
                }
                const T* src = plane + y * w;
                for (int64_t j = 0; j < kw; ++j) {
                    int64_t xx = ow * sw - pw + j * dw;
                    dst[j] = xx >= 0 && xx < w ? src[xx] : (T)0;
                }
            }
        }
    }
}

/* out[((p * hp + y) * sw + ph) * wq + q] = x[p][y - top][q * sw + ph - left], 0 outside x, for planes p
   (the padded input with its columns split into sw phases); then 8 zeros. */
template <typename T>
static void phases(const float* x, T* out, int64_t planes, int64_t h, int64_t w, int64_t hp, int64_t sw, int64_t wq,
                   int64_t top, int64_t left, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t row = 0; row < planes * hp; ++row) {
        int64_t y = row % hp - top;
        T* dst = out + row * sw * wq;
        const float* src = x + (row / hp * h + y) * w;
        for (int64_t ph = 0; ph < sw; ++ph, dst += wq) {
            /* columns q * sw + ph - left of x in [0, w): q in [lo, hi) */
            int64_t lo = left > ph ? (left - ph + sw - 1) / sw : 0, hi = (w + left - ph + sw - 1) / sw;
            if (y < 0 || y >= h) lo = hi = 0;
            hi = hi < wq ? hi : wq;
            lo = lo < hi ? lo : hi;
            for (int64_t q = 0; q < lo; ++q) dst[q] = 0;
            for (int64_t q = lo; q < hi; ++q) dst[q] = (T)src[q * sw + ph - left];
            for (int64_t q = hi; q < wq; ++q) dst[q] = 0;
        }
    }
    for (int l = 0; l < 8; ++l) out[planes * hp * sw * wq + l] = 0;
}

extern "C" void phased_rows(const float* x, void* out, int dtype, int64_t planes, int64_t h, int64_t w, int64_t hp,
                            int64_t sw, int64_t wq, int64_t top, int64_t left, int threads) {
    if (dtype == 0)
        phases(x, (float*)out, planes, h, w, hp, sw, wq, top, left, threads);
    else
        phases(x, (double*)out, planes, h, w, hp, sw, wq, top, left, threads);
}

extern "C" void patch_rows(const void* x, void* out, int dtype, int64_t n, int64_t c, int64_t h, int64_t w,
                           int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                           int64_t dw, int64_t ho, int64_t wo, int threads) {
    if (dtype == 0)
        rows((const float*)x, (float*)out, n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, threads);
    else
        rows((const double*)x, (double*)out, n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, threads);
}
"""


@functools.lru_cache(maxsize=None)
def load_kernel() -> ctypes.CDLL:
    """The compiled library (compiled on the first call, then from inductor's disk cache)."""
    lib = compile_library(_SOURCE)
    lib.patch_rows.restype = None
    lib.patch_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 14 + [ctypes.c_int]
    lib.phased_rows.restype = None
    lib.phased_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 8 + [ctypes.c_int]
    return lib


def patch_rows(x: torch.Tensor, kernel: tuple[int, int], stride, padding, dilation,
               memory: torch.Tensor | None = None) -> torch.Tensor:
    """(N*Ho*Wo, C*kh*kw): row (n, oh, ow) holds the window of output position (oh, ow) of sample
    n, channel-major, zeros where it reaches into the padding; as ``im2col.patches`` reshaped.

    Args:
        x: (N, C, H, W), contiguous, float32 or float64, on the CPU.
        kernel, stride, padding, dilation: pairs, as the convolution's.
        memory: where to write the rows (its first elements, of x's dtype); a new tensor if None.
    """
    require_cpu("patch_rows: x", x, tuple(DTYPES))
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    ho, wo = output_sizes((h, w), kernel, stride, padding, dilation)
    shape = (n * max(ho, 0) * max(wo, 0), c * kh * kw)
    if memory is None:
        out = torch.empty(shape, dtype=x.dtype)
    else:
        require_cpu("patch_rows: memory", memory, (x.dtype,))
        out = memory[:shape[0] * shape[1]].view(shape)
    if out.numel():
        load_kernel().patch_rows(x.data_ptr(), out.data_ptr(), DTYPES[x.dtype], n, c, h, w, kh, kw, sh, sw, ph, pw,
                                 dh, dw, ho, wo, threads_for(out.numel()))
    return out


def phased_rows(x: torch.Tensor, padding, stride, memory: torch.Tensor) -> torch.Tensor:
    """``ops.im2col.phased_input`` in one pass: x padded, its columns split into stride phases,
    converted to memory's dtype, flat, with 8 zeros after it.

    Args:
        x: (N, C, H, W), contiguous float32 on the CPU.
        padding, stride: pairs, as the convolution's.
        memory: float32 or float64, contiguous, of the result's size; returned, filled.
    """
    require_cpu("phased_rows: x", x, (torch.float32,))
    n, c, h, w = x.shape
    (ph, pw), sw = padding, stride[1]
    hp, wq = phased_size(h, w, padding, stride)
    require_cpu("phased_rows: memory", memory, tuple(DTYPES), n * c * hp * sw * wq + 8)
    load_kernel().phased_rows(x.data_ptr(), memory.data_ptr(), DTYPES[memory.dtype], n * c, h, w, hp, sw, wq, ph,
                              pw, threads_for(memory.numel()))
    return memory


register_patch_rows(patch_rows, tuple(DTYPES))
register_phased_rows(phased_rows)
