"""The fused CPU step of Adam with block-wise codebook states (8-bit Adam), in C++.

Built from torch's operations, a step of 8-bit Adam makes some twenty passes over memory
(decode both states, torch's update, each state's absmax, scaling, table lookups) and costs
about 3x fp32 Adam on the CPU. Here each block (256 elements) is decoded, updated and encoded
while it sits in L1, and the parameters updated in a second pass: the same operations in the
same order, so the results are bit-identical to ``torch.optim.Adam`` / ``AdamW`` (their
single-tensor implementation) followed by ``formats.codebook_codes.block_codes``. The library is
compiled once by inductor's C++ toolchain (``cpu_kernels.compile_library``); where that fails,
the caller falls back to the torch path with a warning (``backends.run_or_fall_back``).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from ..formats import CodebookFormat
from ..formats.codebook_codes import rounding_table
from .cpu_kernels import compile_library, require_cpu, threads_for

__all__ = ["AdamHyper", "load_kernel", "takes_formats", "blockwise_adam_step"]

_CHUNK = 1 << 15  # elements a call takes: both moments' float32 values (256 KB) stay in L2

# Each line of the update mirrors one of torch's CPU kernels: lerp's and addcmul's vectorised
# bodies are fmas; mul, div and addcdiv round each operation (-ffp-contract=off: nothing else fuses).
_SOURCE = r"""
template <int BITS>
static inline float code_value(const uint8_t* codes, int64_t i, const float* values) {
    if (BITS == 8) return values[codes[i]];
    uint8_t byte = codes[i >> 1];
    return values[(i & 1) ? (byte & 15) : (byte >> 4)];  /* the first code in the high nibble */
}

/* The block's scale as formats.codebook_codes._absmax computes it; NaN if it holds one. */
template <bool SIGNED>
static inline float block_scale(const float* x, int size) {
    float h, l;
    if (extremes(x, size, &h, &l)) return NAN;
    if (!SIGNED) return h > 0.0f ? h : 0.0f;
    return fabsf(h > -l ? h : -l);
}

template <int BITS, bool SIGNED>
static inline void encode_block(const float* x, int size, uint8_t* codes, float* absmax,
                                const uint8_t* base, const float* threshold) {
    float scale = block_scale<SIGNED>(x, size);
    *absmax = scale;
    float inverse = 1.0f / (scale < 1e-38f ? 1e-38f : scale);
    for (int j = 0; j < size; j += 8 / BITS) {
        uint8_t byte = 0;
        for (int k = 0; k < 8 / BITS; ++k) {
            float v = x[j + k] * inverse;
            uint32_t slice;
            __builtin_memcpy(&slice, &v, 4);
            slice >>= 16;
            byte = (uint8_t)((byte << BITS) | (base[slice] + (v >= threshold[slice])));
        }
        codes[j * BITS / 8] = byte;
    }
}

/* Decode a run of blocks of both moments into m and v (float32), take Adam's update of them,
   the padding past numel keeping its decoded zeros, and encode them back. mode 1: Adam's
   weight decay (grad + weight_decay * param). */
template <int M_BITS, int V_BITS>
static void moments(const float* param, const float* grad, int64_t numel, int size,
                    uint8_t* m_codes, float* m_absmax, const float* m_values, const uint8_t* m_base, const float* m_threshold,
                    uint8_t* v_codes, float* v_absmax, const float* v_values, const uint8_t* v_base, const float* v_threshold,
                    float lerp_weight, float beta2, float one_minus_beta2, int mode, float weight_decay, float* m, float* v,
                    int threads) {
    int64_t blocks = (numel + size - 1) / size;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t block = 0; block < blocks; ++block) {
        int64_t first = block * size, len = numel - first < size ? numel - first : size;
        float m_scale = m_absmax[block], v_scale = v_absmax[block];
        float* mb = m + first;
        float* vb = v + first;
        for (int j = 0; j < size; ++j) {
            mb[j] = code_value<M_BITS>(m_codes, first + j, m_values) * m_scale;
            vb[j] = code_value<V_BITS>(v_codes, first + j, v_values) * v_scale;
        }
        const float* g = grad + first;
        const float* p = param + first;
        if (mode == 1) {
            for (int j = 0; j < len; ++j) {
                float gj = fmaf(p[j], weight_decay, g[j]);
                mb[j] = fmaf(lerp_weight, gj - mb[j], mb[j]);
                vb[j] = fmaf(one_minus_beta2 * gj, gj, vb[j] * beta2);
            }
        } else {
            for (int j = 0; j < len; ++j) {
                mb[j] = fmaf(lerp_weight, g[j] - mb[j], mb[j]);
                vb[j] = fmaf(one_minus_beta2 * g[j], g[j], vb[j] * beta2);
            }
        }
        encode_block<M_BITS, true>(mb, size, m_codes + first * M_BITS / 8, m_absmax + block, m_base, m_threshold);
        encode_block<V_BITS, false>(vb, size, v_codes + first * V_BITS / 8, v_absmax + block, v_base, v_threshold);
    }
}

extern "C" void blockwise_adam_moments(
        const float* param, const float* grad, int64_t numel, int size,
        uint8_t* m_codes, float* m_absmax, int m_bits, const float* m_values, const uint8_t* m_base, const float* m_threshold,
        uint8_t* v_codes, float* v_absmax, int v_bits, const float* v_values, const uint8_t* v_base, const float* v_threshold,
        float lerp_weight, float beta2, float one_minus_beta2, int mode, float weight_decay, float* m, float* v,
        int threads) {
#define MOMENTS(MB, VB) moments<MB, VB>(param, grad, numel, size, m_codes, m_absmax, m_values, m_base, m_threshold, \
    v_codes, v_absmax, v_values, v_base, v_threshold, lerp_weight, beta2, one_minus_beta2, mode, weight_decay, m, v, threads)
    if (m_bits == 8 && v_bits == 8) MOMENTS(8, 8);
    else if (m_bits == 8) MOMENTS(8, 4);
    else if (v_bits == 8) MOMENTS(4, 8);
    else MOMENTS(4, 4);
}

/* param <- param (* decay, mode 2: AdamW's) + (neg_step_size * m) / (root_v / bias_correction2_sqrt + eps) */
extern "C" void adam_update(float* param, const float* m, const float* root_v, int64_t numel,
                            float bias_correction2_sqrt, float eps, float neg_step_size, int mode, float decay,
                            int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t i = 0; i < numel; ++i) {
        float p = mode == 2 ? param[i] * decay : param[i];
        param[i] = p + (neg_step_size * m[i]) / (root_v[i] / bias_correction2_sqrt + eps);
    }
}
"""


@dataclass(frozen=True)
class AdamHyper:
    """One parameter's step of torch's Adam: its group's settings and the step number."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool  # AdamW
    step: float  # the step being taken, from 1 (torch keeps it as a float tensor)


@functools.lru_cache(maxsize=None)
def load_kernel() -> ctypes.CDLL:
    """The compiled library (compiled on the first call, then from inductor's disk cache)."""
    lib = compile_library(_SOURCE)
    pointer, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.blockwise_adam_moments.restype = lib.adam_update.restype = None
    lib.blockwise_adam_moments.argtypes = [pointer, pointer, i64, i32, *[pointer, pointer, i32, pointer, pointer, pointer] * 2,
                                           f32, f32, f32, i32, f32, pointer, pointer, i32]
    lib.adam_update.argtypes = [pointer, pointer, pointer, i64, f32, f32, f32, i32, f32, i32]
    return lib


@functools.lru_cache(maxsize=None)
def _tables(fmt: CodebookFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The codebook's values, and the rounding table's lowest code and threshold per slice."""
    table = rounding_table(fmt)
    return fmt.values().to(torch.float32).contiguous(), table.base, table.threshold


def takes_formats(m_fmt: CodebookFormat, v_fmt: CodebookFormat) -> bool:
    """Whether the kernel steps moments in these formats: one block size, 4 or 8 bits each."""
    return m_fmt.block_size == v_fmt.block_size and {m_fmt.bits, v_fmt.bits} <= {4, 8}


def blockwise_adam_step(param: torch.Tensor, grad: torch.Tensor, m: tuple[torch.Tensor, torch.Tensor],
                        v: tuple[torch.Tensor, torch.Tensor], m_fmt: CodebookFormat, v_fmt: CodebookFormat,
                        hyper: AdamHyper) -> None:
    """One step of torch's Adam on ``param`` whose states are codes: in place, bit-identical to
    decoding the states, ``torch.optim.Adam(W).step()`` and ``block_codes`` of the new states.

    The square root of the second moment is torch's own (``torch.sqrt``, MKL's on x86, which
    is not correctly rounded), taken between two C++ passes over a chunk.

    Args:
        param, grad: float32, contiguous, on the CPU.
        m, v: the first and second moments' code bytes and absmax (``block_codes``' layout),
            contiguous, overwritten.
        m_fmt, v_fmt: their formats: 8 or 4 bits, one block size.
        hyper: the group's settings and the step number.
    """
    _check(param, grad, m, v, m_fmt, v_fmt)
    lib, size = load_kernel(), m_fmt.block_size
    lr, step = hyper.lr, hyper.step
    bias_correction1, bias_correction2 = 1 - hyper.beta1 ** step, 1 - hyper.beta2 ** step
    mode, decay = 0, 0.0
    if hyper.weight_decay != 0:
        mode, decay = (2, 1 - lr * hyper.weight_decay) if hyper.decoupled else (1, hyper.weight_decay)
    numel, chunk = param.numel(), max(size, _CHUNK // size * size)
    scratch = torch.empty(2, min(chunk, -(-numel // size) * size))
    tables = [(fmt.bits, *(t.data_ptr() for t in _tables(fmt))) for fmt in (m_fmt, v_fmt)]
    for first in range(0, numel, chunk):
        n = min(chunk, numel - first)
        threads = threads_for(n)
        codes = [(state[0].data_ptr() + first * fmt.bits // 8, state[1].data_ptr() + first // size * 4)
                 for state, fmt in ((m, m_fmt), (v, v_fmt))]
        p, g = param.data_ptr() + 4 * first, grad.data_ptr() + 4 * first
        lib.blockwise_adam_moments(p, g, n, size, *codes[0], *tables[0], *codes[1], *tables[1],
                                   1 - hyper.beta1, hyper.beta2, 1 - hyper.beta2, mode if mode == 1 else 0, decay,
                                   scratch[0].data_ptr(), scratch[1].data_ptr(), threads)
        root = scratch[1, :n].sqrt_()
        lib.adam_update(p, scratch[0].data_ptr(), root.data_ptr(), n, bias_correction2 ** 0.5, hyper.eps,
                        -(lr / bias_correction1), mode, decay, threads)


def _check(param: torch.Tensor, grad: torch.Tensor, m: tuple[torch.Tensor, torch.Tensor],
           v: tuple[torch.Tensor, torch.Tensor], m_fmt: CodebookFormat, v_fmt: CodebookFormat) -> None:
    """The kernel reads raw pointers: refuse what would make it read or write out of bounds."""
    require_cpu("blockwise_adam_step: param", param, (torch.float32,))
    require_cpu("blockwise_adam_step: grad", grad, (torch.float32,), param.numel())
    if not takes_formats(m_fmt, v_fmt):
        raise ValueError(f"blockwise_adam_step: {m_fmt} and {v_fmt} must share a block size and have 4 or 8 bits")
    blocks = -(-param.numel() // m_fmt.block_size)
    for (codes, absmax), fmt in ((m, m_fmt), (v, v_fmt)):
        require_cpu(f"blockwise_adam_step: the codes of {fmt}", codes, (torch.uint8,))
        require_cpu(f"blockwise_adam_step: the absmax of {fmt}", absmax, (torch.float32,))
        if absmax.numel() != blocks or codes.numel() != blocks * fmt.block_size * fmt.bits // 8:
            raise ValueError(f"blockwise_adam_step: the codes and absmax of {fmt} do not cover {param.numel()} "
                             f"elements (block_codes' layout)")
