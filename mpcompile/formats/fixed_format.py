"""Fixed point: values k * 2**-fl for k in a wl-bit two's complement (or unsigned) range."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .float_format import check_int

__all__ = ["FixedFormat"]


@dataclass(frozen=True)
class FixedFormat:
    """Fixed point with word length ``wl`` and ``fl`` fractional bits.

    Args:
        wl: word length in bits, 1..53 (2..53 when signed), so that every value is a float64.
        fl: fractional bits, -252..252; may be negative or exceed ``wl``.
        signed: two's complement (range ``[-2**(wl-1), 2**(wl-1)-1] * 2**-fl``) or unsigned.

    ``eps`` and ``unit_roundoff`` are absolute (the spacing ``2**-fl`` and half of it), since
    the spacing of fixed point does not scale with the value. There is no -0, inf or NaN.
    """

    wl: int
    fl: int
    signed: bool = True

    def __post_init__(self) -> None:
        check_int("wl", self.wl, 2 if self.signed else 1, 53)
        check_int("fl", self.fl, -252, 252)

    @property
    def bits(self) -> int:
        return self.wl

    @property
    def max_int(self) -> int:
        return 2 ** (self.wl - 1) - 1 if self.signed else 2**self.wl - 1

    @property
    def min_int(self) -> int:
        return -(2 ** (self.wl - 1)) if self.signed else 0

    @property
    def max(self) -> float:
        return math.ldexp(self.max_int, -self.fl)

    @property
    def min(self) -> float:
        """Most negative value (``-max - 2**-fl`` when signed, 0 when unsigned)."""
        return math.ldexp(self.min_int, -self.fl)

    @property
    def emax(self) -> int:
        return math.frexp(self.max)[1] - 1

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, -self.fl)

    @property
    def min_subnormal(self) -> float:
        return math.ldexp(1.0, -self.fl)

    @property
    def eps(self) -> float:
        return math.ldexp(1.0, -self.fl)

    @property
    def unit_roundoff(self) -> float:
        return math.ldexp(1.0, -self.fl - 1)

    @property
    def is_finite_only(self) -> bool:
        return True

    def values(self) -> torch.Tensor:
        """Every value, ascending, in float64."""
        if self.bits > 16:
            raise ValueError(f"values(): {self} has {self.bits} bits; enumeration is limited to 16")
        return torch.arange(self.min_int, self.max_int + 1, dtype=torch.float64) * 2.0**-self.fl

    def __str__(self) -> str:
        return f"fixed({self.wl},{self.fl}{'' if self.signed else ',unsigned'})"
