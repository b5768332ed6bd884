"""Counter-based random bits for stochastic rounding: word i = mix(mix(i) ^ seed).

Each word depends only on the seed and the element's index, so every backend (eager torch,
the compiled CPU kernel, Triton) and every device computes the same bits, and a compiled
kernel generates them in registers instead of reading a tensor of them. ``mix`` is Wellons'
``lowbias32``, a bijection on 32-bit words; it is computed in int64 with multipliers below
2**31 in magnitude so that no product overflows (torch leaves signed overflow undefined).
"""
from __future__ import annotations

import torch

__all__ = ["counter_bits", "counter_words", "counter_word", "mix32", "stream_seed", "COUNTER_BITS", "MASK32", "MIX_MUL1",
           "MIX_MUL2", "INDEX_FOLD"]

COUNTER_BITS = 32  # bits per word
MASK32 = 0xFFFFFFFF
MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x846CA68B - 2**32  # the same product mod 2**32, as a negative int64 multiplier
INDEX_FOLD = 0x61C88647  # folds index bits above 32 into the low word
_EAGER_CHUNK = 1 << 16


def mix32(v: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor of 32-bit words (values in [0, 2**32))."""
    v = ((v ^ (v >> 16)) * MIX_MUL1) & MASK32
    v = ((v ^ (v >> 15)) * MIX_MUL2) & MASK32
    return v ^ (v >> 16)


def counter_words(index: torch.Tensor, seed: "torch.Tensor | int") -> torch.Tensor:
    """mix(mix(i) ^ seed) for int64 indices i >= 0 (broadcasting index against seed)."""
    return mix32(mix32((index ^ ((index >> 32) * INDEX_FOLD)) & MASK32) ^ seed)


def stream_seed(seed: int, stream: int, step: int) -> int:
    """The seed of one rounding step of an emulated reduction: a word per (stream, step).

    An op's reductions draw the bits of rounding ``step`` in ``stream`` (products, adds, ...)
    for output element ``i`` as ``counter_words(i, stream_seed(seed, stream, step))``.
    """
    return _mix_int(seed ^ _mix_int((step * 8 + stream) & MASK32))


def counter_word(index: int, seed: int) -> int:
    """One word of ``counter_words``, in pure Python (for scalar references)."""
    return _mix_int(_mix_int((index ^ ((index >> 32) * INDEX_FOLD)) & MASK32) ^ seed)


def _mix_int(v: int) -> int:
    v = ((v ^ (v >> 16)) * 0x7FEB352D) & MASK32
    v = ((v ^ (v >> 15)) * 0x846CA68B) & MASK32
    return v ^ (v >> 16)


def counter_bits(seed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """int64 tensor of ``shape`` with 32 random bits per element (row-major index order).

    Args:
        seed: 0-d int64 tensor in [0, 2**32), on the device the bits are wanted on.
        shape: the shape of the tensor being rounded.
    """
    n = shape.numel()
    if torch.compiler.is_compiling() or seed.device.type != "cpu" or n <= _EAGER_CHUNK:
        return counter_words(torch.arange(n, dtype=torch.int64, device=seed.device), seed).view(shape)
    out = torch.empty(n, dtype=torch.int64)  # eager CPU: a chunk's temporaries stay in cache (3x faster)
    for start in range(0, n, _EAGER_CHUNK):
        out[start:start + _EAGER_CHUNK] = counter_words(torch.arange(start, min(start + _EAGER_CHUNK, n)), seed)
    return out.view(shape)
