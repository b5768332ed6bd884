"""Block formats: elements of a scalar format sharing one power-of-two scale per block.

Every block format here scales a block by ``2**s`` with ``s = floor(log2(amax)) - element.emax``,
clipped to the E8M0 range ``[-127, 127]`` (``-127`` for an all-zero block), and rounds the
elements with saturation. That is OCP Microscaling v1.0 (``MXFormat``), block floating point
(``BlockFloat``: integer elements) and block minifloat (``BlockMinifloat``: minifloat elements
with a shared exponent bias). A block containing NaN is NaN; a tail block along the axis may
be shorter than ``block_size``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import FormatError
from .fixed_format import FixedFormat
from .float_format import FloatFormat, check_int
from .table import entries, get

__all__ = ["BlockFormat", "MXFormat", "BlockFloat", "BlockMinifloat", "SCALE_EXP_MIN", "SCALE_EXP_MAX", "block_spec"]

SCALE_EXP_MIN, SCALE_EXP_MAX = -127, 127


class BlockFormat:
    """Shared behaviour of block-scaled formats; subclasses define ``element``."""

    element: FloatFormat | FixedFormat
    block_size: int
    axis: int

    def _check_block(self) -> None:
        check_int("block_size", self.block_size, 1, 2**20)
        check_int("axis", self.axis, -64, 63)

    @property
    def bits(self) -> int:
        """Bits of one element (the 8-bit scale is shared by ``block_size`` of them)."""
        return self.element.bits

    @property
    def max(self) -> float:
        return math.ldexp(self.element.max, SCALE_EXP_MAX)

    @property
    def min_normal(self) -> float:
        return math.ldexp(self.element.min_normal, SCALE_EXP_MIN)

    @property
    def min_subnormal(self) -> float:
        return math.ldexp(self.element.min_subnormal, SCALE_EXP_MIN)

    @property
    def eps(self) -> float:
        return self.element.eps

    @property
    def unit_roundoff(self) -> float:
        return self.element.unit_roundoff

    @property
    def is_finite_only(self) -> bool:
        return True

    def values(self) -> torch.Tensor:
        """Every value some block can hold: element values times every scale, ascending."""
        if self.bits > 16:
            raise ValueError(f"values(): {self} has {self.bits}-bit elements; enumeration is limited to 16")
        elem = self.element.values()
        scales = torch.arange(SCALE_EXP_MIN, SCALE_EXP_MAX + 1, dtype=torch.float64).exp2()
        return torch.unique((elem[:, None] * scales[None, :]).flatten())

    def _suffix(self, default_block: int | None) -> str:
        parts = [] if self.block_size == default_block else [str(self.block_size)]
        return "".join("," + p for p in parts) + ("" if self.axis == -1 else f",axis={self.axis}")


@dataclass(frozen=True)
class MXFormat(BlockFormat):
    """OCP Microscaling: E8M0 scale per ``block_size`` elements (MXFP8/6/4, MXINT8).

    Args:
        element: element format (``fp8_e4m3``, ``fp8_e5m2``, ``fp6_e3m2``, ``fp6_e2m3``,
            ``fp4_e2m1``, ``int8`` = ``fixed(8,6)``) or any float/fixed format, or the registered
            name of one (``formats.parse`` reads a spec).
        block_size: elements per scale.
        axis: the dimension along which blocks run.
    """

    element: FloatFormat | FixedFormat
    block_size: int = 32
    axis: int = -1

    def __post_init__(self) -> None:
        if isinstance(self.element, str):
            try:
                object.__setattr__(self, "element", get(self.element))
            except FormatError as err:
                raise FormatError(f"MXFormat: element {self.element!r} is not a registered name; for a spec, pass "
                                  f"formats.parse({self.element!r}) ({err})") from None
        if not isinstance(self.element, (FloatFormat, FixedFormat)):
            raise ValueError(f"MXFormat: element={self.element!r} must be a float or fixed format")
        self._check_block()

    def __str__(self) -> str:
        return block_spec(self)


@dataclass(frozen=True)
class BlockFloat(BlockFormat):
    """Block floating point (SWALP, MSFP): ``wl``-bit signed integers with a shared exponent.

    The integers carry ``wl - 2`` fraction bits below the block's leading power of two,
    i.e. the element format is ``fixed(wl, wl-2)`` (so ``BlockFloat(8, 32)`` is MXINT8).
    """

    wl: int
    block_size: int
    axis: int = -1

    def __post_init__(self) -> None:
        check_int("wl", self.wl, 2, 32)
        self._check_block()

    @property
    def element(self) -> FixedFormat:
        return FixedFormat(self.wl, self.wl - 2)

    def __str__(self) -> str:
        return f"bfp({self.wl},{self.block_size}{self._suffix(self.block_size)})"


@dataclass(frozen=True)
class BlockMinifloat(BlockFormat):
    """Block minifloat (Fox et al., BM8): ``e{exp}m{man}`` elements, no inf or NaN, with a
    shared exponent bias per block chosen so the block's largest value lands in the top binade."""

    exp: int
    man: int
    block_size: int
    axis: int = -1

    def __post_init__(self) -> None:
        self.element  # validates exp and man
        self._check_block()

    @property
    def element(self) -> FloatFormat:
        return FloatFormat(self.exp, self.man, inf=False, nan="none")

    def __str__(self) -> str:
        return f"bm({self.exp},{self.man},{self.block_size}{self._suffix(self.block_size)})"


def block_spec(fmt: MXFormat) -> str:
    """The spec ``formats.parse`` reads back to ``fmt``: its registered name (``mxfp8_e4m3``) if it
    has one, else ``mx(element,block_size[,axis=n])``."""
    if fmt.axis == -1:
        for name, known in entries():
            if isinstance(known, MXFormat) and known.element == fmt.element and fmt.block_size == known.block_size:
                return name
    return f"mx({fmt.element},{fmt.block_size}{'' if fmt.axis == -1 else f',axis={fmt.axis}'})"
