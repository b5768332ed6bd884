"""``Arithmetic``: the precision a classical solver computes in, native or emulated.

The sweep runs the same solver (a decision tree, least squares) in many precisions. A solver
written against ``Arithmetic`` rounds every intermediate result with ``arith(...)``: in a
native dtype that is a no-op (torch's own float16/bfloat16/float32 ops already round), in an
emulated format it quantizes the float32 (or float64) result to the format. Both modes share
one code path and one operation order, so they can be compared bit for bit.

Reductions are where the order matters most (torch's own ``sum``/``cumsum`` on float16
accumulate in float32 and round only the result), so ``sum`` and ``cumsum`` here are made of
elementwise additions, each rounded, in a fixed order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import FixedFormat, FloatFormat, Format, parse
from ..rounding import quantize

__all__ = ["Arithmetic"]

_NATIVE = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_SIGNIFICAND = {torch.float32: 24, torch.float64: 53}  # bits of the emulating storage


@dataclass(frozen=True)
class Arithmetic:
    """Where a computation's numbers live: a torch dtype whose own arithmetic rounds (native),
    or float32 tensors rounded to a number format after every operation (emulated).

    An emulated operation is computed in ``dtype`` and then rounded to ``fmt`` (``sqrt`` in
    float64). That double rounding equals one correct rounding wherever the storage has at
    least 2p + 2 significand bits for a p-bit format (fp16, bf16 and narrower in float32), so
    emulated fp16 is native fp16 to the bit. Wider formats want ``dtype=torch.float64``.

    Overflow: a format with infinities overflows to inf, as the IEEE native dtypes do; one
    without (fp8_e4m3, fixed point) saturates to its largest value, as OCP's saturating
    conversion does, instead of to NaN, which would end the computation at the first overflow.

    Args:
        dtype: the tensors' dtype: float64, float32, float16 or bfloat16 when native, float32
            or float64 when emulated.
        fmt: a float or fixed-point format (or a spec ``formats.parse`` reads) to emulate.

    Raises:
        NotImplementedError: a native dtype without CPU arithmetic (the float8 dtypes).
        ValueError: an emulated format that is block-scaled, a codebook, or wider than ``dtype``.
    """

    dtype: torch.dtype
    fmt: Format | None = None

    def __post_init__(self) -> None:
        if self.fmt is None:
            if self.dtype not in _NATIVE:
                raise NotImplementedError(
                    f"Arithmetic: torch has no CPU arithmetic (add, div, comparisons) for {self.dtype}; emulate it "
                    f"instead, e.g. Arithmetic(torch.float32, 'fp8_e4m3')")
            return
        fmt = parse(self.fmt)
        object.__setattr__(self, "fmt", fmt)
        if self.dtype not in _SIGNIFICAND:
            raise ValueError(f"Arithmetic: an emulated format is stored in float32 or float64, not {self.dtype}")
        if not isinstance(fmt, (FloatFormat, FixedFormat)):
            raise ValueError(f"Arithmetic: {fmt} is not a per-value format; emulate a float or fixed-point format")
        width = fmt.man + 1 if isinstance(fmt, FloatFormat) else fmt.wl
        if width > _SIGNIFICAND[self.dtype]:
            raise ValueError(f"Arithmetic: {fmt} has {width} significand bits, more than {self.dtype} holds; "
                             f"use dtype=torch.float64")

    @property
    def emulated(self) -> bool:
        """Whether values are rounded to ``fmt`` rather than held in a native dtype."""
        return self.fmt is not None

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.fmt} (emulated in {dtype})" if self.emulated else dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x in this precision: cast to ``dtype``, then (emulated) rounded to nearest in ``fmt``.

        Args:
            x: any real tensor (a float64 input reaches an emulated format through ``dtype``,
                as torch's own float64 -> float16 cast goes through float32).
        """
        x = x.to(self.dtype)
        if self.fmt is None:
            return x
        return quantize(x, self.fmt, "nearest", saturate=not getattr(self.fmt, "inf", False))

    def sqrt(self, x: torch.Tensor) -> torch.Tensor:
        """The square root, correctly rounded (torch's float32 ``sqrt`` on the CPU is not).

        Args:
            x: a tensor in this precision.
        """
        if self.fmt is None:
            return torch.sqrt(x)
        return self(torch.sqrt(x.to(torch.float64)))

    def sum(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Pairwise sum along ``dim``, every addition rounded: the first half of the entries is
        added to the second half, elementwise, until one is left (an odd one out joins the next round).

        Args:
            x: a tensor in this precision.
            dim: the dimension summed away.
        """
        x = x.movedim(dim, 0)
        if x.shape[0] == 0:
            return self(torch.zeros(x.shape[1:]))
        while x.shape[0] > 1:
            h = x.shape[0] // 2
            x = torch.cat([self(x[:h] + x[h:2 * h]), x[2 * h:]])
        return x[0]

    def cumsum(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Inclusive prefix sums along ``dim``, every addition rounded: a Hillis-Steele scan,
        ``ceil(log2(n))`` rounded additions per entry in a fixed order (a sequential scan would
        be a Python loop over the entries).

        Args:
            x: a tensor in this precision.
            dim: the dimension scanned.
        """
        x = x.movedim(dim, 0)
        k = 1
        while k < x.shape[0]:
            x = torch.cat([x[:k], self(x[k:] + x[:-k])])
            k *= 2
        return x.movedim(0, dim)
