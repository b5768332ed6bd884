"""Counter-based random bits for stochastic rounding: word i = mix(mix(i) ^ seed).

Each word depends only on the seed and the element's index, so every backend (eager torch,
the compiled CPU kernel, Triton) and every device computes the same bits, and a compiled
kernel generates them in registers instead of reading a tensor of them. ``mix`` is Wellons'
``lowbias32``, a bijection on 32-bit words; torch computes it in int64 with multipliers below
2**31 in magnitude so that no product overflows (torch leaves signed overflow undefined), and
eager CPU code in numpy's uint32, whose products wrap mod 2**32 by definition.
"""
from __future__ import annotations

import functools

import numpy as np
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
    v = (v ^ (v >> 16)).mul_(MIX_MUL1).bitwise_and_(MASK32)  # in place after the first op: v is not mutated
    v = v.bitwise_xor_(v >> 15).mul_(MIX_MUL2).bitwise_and_(MASK32)
    return v.bitwise_xor_(v >> 16)


def counter_words(index: torch.Tensor, seed: "torch.Tensor | int") -> torch.Tensor:
    """mix(mix(i) ^ seed) for int64 indices i >= 0 (broadcasting index against seed)."""
    return mix32(mix32((index ^ ((index >> 32) * INDEX_FOLD)) & MASK32) ^ seed)


def stream_seed(seed: int, stream: int, step: int) -> int:
    """The seed of one rounding step of an emulated reduction: a word per (stream, step).

    An op's reductions draw the bits of rounding ``step`` in ``stream`` (products, adds, ...)
    for output element ``i`` as ``counter_words(i, stream_seed(seed, stream, step))``.
    """
    return _mix_int(seed ^ _mix_int((step * 8 + stream) & MASK32))


def _mix32_numpy(v: np.ndarray) -> np.ndarray:
    """``mix32`` on uint32 words, in place: numpy's unsigned arithmetic wraps mod 2**32 by definition."""
    v ^= v >> 16
    v *= np.uint32(MIX_MUL1)
    v ^= v >> 15
    v *= np.uint32(MIX_MUL2 + 2**32)
    v ^= v >> 16
    return v


def _mixed_range_numpy(start: int, stop: int) -> np.ndarray:
    """mix(i) for i in [start, stop), as uint32."""
    i = np.arange(start, stop, dtype=np.uint64)
    return _mix32_numpy(((i ^ ((i >> np.uint64(32)) * np.uint64(INDEX_FOLD))) & np.uint64(MASK32)).astype(np.uint32))


@functools.lru_cache(maxsize=32)
def _mixed_arange_numpy(n: int) -> np.ndarray:
    """mix(i) for i in [0, n), kept (read only): small tensors are rounded again and again (an
    optimizer's state every step), and this is half of their words' cost."""
    v = _mixed_range_numpy(0, n)
    v.flags.writeable = False
    return v


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
    if torch.compiler.is_compiling() or seed.device.type != "cpu":
        return counter_words(torch.arange(n, dtype=torch.int64, device=seed.device), seed).view(shape)
    # eager CPU: numpy's uint32 ops cost a fraction of torch's int64 ones on small tensors, and
    # chunks keep a large tensor's temporaries in cache
    word = np.uint32(int(seed))
    if n <= _EAGER_CHUNK:
        words = torch.from_numpy(_mix32_numpy(_mixed_arange_numpy(n) ^ word).astype(np.int64))
        return words if len(shape) == 1 else words.view(shape)
    out = np.empty(n, dtype=np.int64)
    for start in range(0, n, _EAGER_CHUNK):
        stop = min(start + _EAGER_CHUNK, n)
        out[start:stop] = _mix32_numpy(_mixed_range_numpy(start, stop) ^ word)
    return torch.from_numpy(out).view(shape)
