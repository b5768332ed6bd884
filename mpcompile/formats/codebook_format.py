"""Block-wise codebook formats: the dynamic tree quantization of 8-bit optimizers.

Dettmers, Lewis, Shleifer and Zettlemoyer, "8-bit Optimizers via Block-wise Quantization"
(ICLR 2022), as bitsandbytes implements it: the flattened tensor is cut into blocks of
``block_size`` consecutive elements (the last block may be shorter); a block is stored as its
absolute maximum, an fp32 scale, and per element the index of an entry of a fixed codebook in
[-1, 1]. An element's value is ``fp32(entry * absmax)``.

The codebooks are bitsandbytes' ``create_dynamic_map`` with every exponent bit dynamic:
``dynamic8`` (signed, 256 entries) is the map of its 8-bit optimizers' first state (momentum),
``dynamic8u`` (unsigned: the sign bit is one more fraction bit) the map of their second state
(Adam's exp_avg_sq); ``dynamic4`` and ``dynamic4u`` are the 16-entry maps of the same
construction with 4 bits (``create_dynamic_map(signed, 3, 4)`` without the zeros it pads to 256).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .float_format import check_int

__all__ = ["CodebookFormat", "CODEBOOKS", "dynamic_map"]

# name -> (signed, bits)
CODEBOOKS: dict[str, tuple[bool, int]] = {"dynamic8": (True, 8), "dynamic8u": (False, 8),
                                          "dynamic4": (True, 4), "dynamic4u": (False, 4)}


@functools.lru_cache(maxsize=None)
def dynamic_map(signed: bool, bits: int) -> torch.Tensor:
    """The dynamic tree codebook of ``bits`` bits: ``2**bits`` float32 entries, ascending.

    Entry ``i`` of decade ``d`` (``d = 0 .. bits - 2``) is ``10**(d - bits + 2)`` times the centre
    of the ``i``-th of ``2**(d + 1)`` (signed: ``2**d``) equal parts of [0.1, 1]; a signed map
    also has the negatives; then 0 and 1. The arithmetic is bitsandbytes' (``create_dynamic_map``
    with ``max_exponent_bits = total_bits - 1``): float32 parts and centres, the decade's power of
    ten applied in float32, so that every entry equals its map bit for bit.

    Args:
        signed: whether the map has negative entries.
        bits: 2 .. 8.
    """
    check_int("bits", bits, 2, 8)
    entries = [0.0, 1.0]
    for decade in range(bits - 1):
        parts = 2 ** (decade + (0 if signed else 1))
        edges = torch.linspace(0.1, 1.0, parts + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (decade - bits + 2)
        entries += (scale * centres).tolist()
        if signed:
            entries += (-scale * centres).tolist()
    return torch.tensor(sorted(entries), dtype=torch.float32)


@dataclass(frozen=True)
class CodebookFormat:
    """A block-wise codebook format: ``blockwise(codebook, block_size)``.

    Per block of ``block_size`` elements of the flattened tensor, an fp32 absmax (an unsigned
    codebook's: the largest value; its negatives round to 0); per element a ``bits``-bit index
    into the codebook. Rounding is to the nearest entry of ``x / absmax`` (``codebook_codes``);
    a block whose absmax is 0 is all zeros, one holding inf or NaN is NaN. Rounding a signed
    block twice can change it: a block whose largest magnitude is negative keeps 0.99297 of it
    (``dynamic8`` has no -1), and the second rounding scales by that. ``max``, ``min_normal``
    and ``eps`` are relative to the absmax. Only optimizer states take these formats (the
    policy's ``optimizer.momentum`` and ``second_moment``); with ``dynamic4u`` for Adam's
    second moment, an exp_avg_sq rounded to 0 under a nonzero exp_avg makes the step explode
    (the zero-point problem, Li et al. 2023): keep the second moment 8-bit.

    Args:
        codebook: one of ``CODEBOOKS``.
        block_size: elements per absmax, even (two 4-bit codes share a byte), 2 .. 2**20.
    """

    codebook: str
    block_size: int = 256

    def __post_init__(self) -> None:
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"blockwise: unknown codebook {self.codebook!r}; use one of {', '.join(CODEBOOKS)}")
        check_int("block_size", self.block_size, 2, 2**20)
        if self.block_size % 2:
            raise ValueError(f"blockwise: block_size {self.block_size} must be even (4-bit codes are stored in pairs)")

    @property
    def signed(self) -> bool:
        return CODEBOOKS[self.codebook][0]

    @property
    def bits(self) -> int:
        """Bits of one element's code (the fp32 absmax is shared by ``block_size`` of them)."""
        return CODEBOOKS[self.codebook][1]

    @property
    def is_finite_only(self) -> bool:
        return True

    # ranges relative to a block's absmax: a block's values are its absmax times the codebook's
    @property
    def max(self) -> float:
        return 1.0

    @property
    def min_normal(self) -> float:
        """The smallest positive entry (as ``min_subnormal``: the codebook has no subnormals)."""
        values = self.values()
        return float(values[values > 0][0])

    @property
    def min_subnormal(self) -> float:
        return self.min_normal

    @property
    def eps(self) -> float:
        """The gap below the largest entry, 1."""
        return 1.0 - float(self.values()[-2])

    @property
    def unit_roundoff(self) -> float:
        return self.eps / 2

    def values(self) -> torch.Tensor:
        """The codebook: the values of a block whose absmax is 1, ascending, float32."""
        return dynamic_map(self.signed, self.bits)

    def __str__(self) -> str:
        return f"blockwise({self.codebook},{self.block_size})"
