"""Counter-based random bits for stochastic rounding: word i = mix(mix(i) ^ seed).

Each word depends only on the seed and the element's index, so every backend (eager torch,
the compiled CPU kernel, Triton) and every device computes the same bits, and a compiled
kernel generates them in registers instead of reading a tensor of them. ``mix`` is Wellons'
``lowbias32``, a bijection on 32-bit words; it is computed in int64 with multipliers below
2**31 in magnitude so that no product overflows (torch leaves signed overflow undefined).
"""
from __future__ import annotations

import torch

__all__ = ["counter_bits", "mix32", "COUNTER_BITS"]

COUNTER_BITS = 32  # bits per word
_M32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - 2**32  # the same product mod 2**32, as a negative int64 multiplier
_GOLDEN = 0x61C88647  # folds index bits above 32 into the low word
_EAGER_CHUNK = 1 << 16


def mix32(v: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor of 32-bit words (values in [0, 2**32)), in place."""
    v.bitwise_xor_(v >> 16).mul_(_MUL1).bitwise_and_(_M32)
    v.bitwise_xor_(v >> 15).mul_(_MUL2).bitwise_and_(_M32)
    return v.bitwise_xor_(v >> 16)


def counter_bits(seed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """int64 tensor of ``shape`` with 32 random bits per element (row-major index order).

    Args:
        seed: 0-d int64 tensor in [0, 2**32), on the device the bits are wanted on.
        shape: the shape of the tensor being rounded.
    """
    n = shape.numel()
    if torch.compiler.is_compiling() or seed.device.type != "cpu" or n <= _EAGER_CHUNK:
        return _words(torch.arange(n, dtype=torch.int64, device=seed.device), seed).view(shape)
    out = torch.empty(n, dtype=torch.int64)  # eager CPU: a chunk's temporaries stay in cache (3x faster)
    for start in range(0, n, _EAGER_CHUNK):
        out[start:start + _EAGER_CHUNK] = _words(torch.arange(start, min(start + _EAGER_CHUNK, n)), seed)
    return out.view(shape)


def _words(idx: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """mix(mix(i) ^ seed) for the indices idx (consumed)."""
    words = idx.bitwise_xor_((idx >> 32).mul_(_GOLDEN)).bitwise_and_(_M32)
    return mix32(mix32(words).bitwise_xor_(seed))
