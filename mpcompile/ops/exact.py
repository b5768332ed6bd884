"""Exact float64 arithmetic for emulated ops: error-free transforms and rounding of exact values.

An emulated add or multiply rounds the *exact* result once. In float64 the exact result of
``a + b`` (or ``a * b``) is the pair ``(s, e)`` of an error-free transform, ``s + e`` exactly,
with ``s`` the float64 result and ``|e| <= ulp(s) / 2``. ``round_exact`` rounds ``s + e`` to a
float format as ``quantize`` would round it:

- ``nearest``: rounding ``s`` is right unless ``s`` is a midpoint of the format and ``e != 0``;
  then ``e`` decides the side.
- other modes: ``s + e`` is first rounded to odd in float64 (truncate, set the last bit if
  inexact), which keeps every bit a rounding to <= 51 significant bits looks at.

The rounding itself (``round_float``) uses float operations only, since inductor's CPU code
turns each bit reinterpretation into a scalar loop: the quantum comes from Rump's ``ufp`` and
the rounding from adding and subtracting ``1.5 * 2**52`` quanta. Formats it cannot serve
(no subnormals, no zero, unsigned, ``man == 0``) fall back to ``reference_quantize``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..formats import FloatFormat
from ..rounding import QuantParams, QuantPlan, plan_quantize, reference_quantize

__all__ = ["Grid", "grid_of", "two_sum", "two_prod", "ufp", "round_to_odd", "round_float", "round_exact"]

_MAGIC = 1.5 * 2.0**52  # x + q * _MAGIC rounds x to a multiple of q (ties to even) for x < 2**51 q
_PHI = 2.0**52 + 1
_SPLIT = 2.0**27 + 1


@dataclass(frozen=True)
class Grid:
    """What ``round_float`` needs of a float format, as Python numbers (kernel constants)."""

    man: int
    qmin: float  # the quantum of the subnormal binade
    max: float
    min_normal: float
    split: float  # Veltkamp's 2**(52 - man) + 1: x*split - (x*split - x) is x rounded to man + 1 bits
    big: float  # magnitudes are clamped to this (> max, so they still overflow) to keep ufp in range
    overflow: float  # the smallest magnitude that rounds to nearest above max
    has_inf: bool
    neg_zero: bool
    fallback: tuple[QuantPlan, QuantParams] | None  # formats the fast path does not serve


@functools.lru_cache(maxsize=256)
def grid_of(fmt: FloatFormat, rounding: str, sr_bits: int) -> Grid:
    fast = fmt.signed and fmt.has_zero and fmt.subnormals and fmt.man > 0
    fallback = None if fast else plan_quantize(fmt, rounding, False, torch.float64, sr_bits)
    quantum = 2.0 ** (math.floor(math.log2(fmt.max)) - fmt.man)  # of max's binade
    tie = fmt.max + quantum / 2  # goes to the even neighbour: above max iff max's code is odd
    overflow = tie if int(fmt.max / quantum) % 2 else math.nextafter(tie, math.inf)
    return Grid(fmt.man, 2.0 ** (fmt.emin - fmt.man), fmt.max, 2.0 ** fmt.emin, 2.0 ** (52 - fmt.man) + 1,
                2.0 ** (fmt.emax + 2), overflow, fmt.inf, bool(fmt.neg_zero), fallback)


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def two_prod(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, e) with p = fl(a * b) and p + e = a * b exactly (Dekker; no over/underflow)."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, (((ah * bh - p) + ah * bl) + al * bh) + al * bl


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = x * _SPLIT
    hi = c - (c - x)
    return hi, x - hi


def ufp(a: torch.Tensor) -> torch.Tensor:
    """2**floor(log2|a|) (0 for 0), by float operations only (Rump); |a| in [2**-960, 2**960]."""
    q = a * _PHI
    return (q - q * (1 - 2.0**-53)).abs()


def round_to_odd(s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """s + e rounded to float64 by truncation with the last bit set if inexact."""
    inexact = (e != 0) & (s.abs() != torch.inf)
    bits = s.view(torch.int64)
    toward_zero = inexact & ((e < 0) != (s < 0))  # |s| is above |s + e|: step down one ulp
    return ((bits - toward_zero.to(torch.int64)) | inexact.to(torch.int64)).view(torch.float64)


def round_float(x: torch.Tensor, grid: Grid, mode: str, bits: torch.Tensor | None = None, n: int = 0,
                signed_zeros: bool = True, overflow: bool = True) -> torch.Tensor:
    """``quantize(x, fmt, mode)`` for float64 x, bit for bit.

    Args:
        x: float64 tensor.
        grid: ``grid_of(fmt, mode, n)``.
        mode: a rounding mode of ``quantize``.
        bits: for ``stochastic``: int64 tensor of x's shape (broadcastable), low ``n`` bits used.
        n: random bits per value (``sr_bits``).
        signed_zeros: False: ``nearest`` may give +0 where quantize gives -0 (for callers to whom
            the sign of a zero cannot matter; it saves three ops a value).
        overflow: False: the caller knows that ``nearest`` cannot overflow (``|x| <
            grid.overflow``); it saves three more.
    """
    if grid.fallback is not None:
        plan, params = grid.fallback
        return reference_quantize(x, plan, params, None if bits is None else bits.expand(x.shape))
    if mode == "nearest":
        return _round_nearest(x, grid, signed_zeros, overflow)
    a = torch.clamp_max(x.abs(), grid.big)
    q = torch.clamp_min(ufp(a) * 2.0**-grid.man, grid.qmin)
    m = q * _MAGIC
    rn = (a + m) - m
    fl = torch.where(a - rn < 0, rn - q, rn)
    rem = a - fl  # exact, in [0, q)
    if mode == "toward_zero":
        away = None
    elif mode == "nearest_away":
        away = rem >= q * 0.5
    elif mode in ("up", "down"):
        away = (rem > 0) & ((x < 0) if mode == "down" else (x > 0))
    elif mode == "odd":
        even = ((fl + 2 * m) - 2 * m) == fl
        away = (rem > 0) & even
    else:  # stochastic, as gfloat: rem / q rounded to n bits (ties to even), plus the bits
        g = q * 2.0**-n
        gm = g * _MAGIC
        d = (rem + gm) - gm
        away = d + (bits & ((1 << n) - 1)).to(torch.float64) * g >= q
    r = fl if away is None else fl + torch.where(away, q, 0.0)
    return _finish(r, x, grid, mode)


def _round_nearest(x: torch.Tensor, grid: Grid, signed_zeros: bool, overflow: bool) -> torch.Tensor:
    """Overflow is decided on |x|, which needs no clamp: a huge or infinite x may give NaN in
    ``_nearest_signed``, but then it overflows. Its results have x's sign but for zeros."""
    r = _nearest_signed(x, grid)
    if overflow:
        r = torch.where(x.abs() >= grid.overflow, x * math.inf if grid.has_inf else math.nan, r)
    return _zero_sign(r, x, grid) if signed_zeros else r


def round_exact(s: torch.Tensor, e: torch.Tensor | None, grid: Grid, mode: str,
                bits: torch.Tensor | None = None, n: int = 0, signed_zeros: bool = True,
                overflow: bool = True) -> torch.Tensor:
    """Round the exact value ``s + e`` (from ``two_sum``/``two_prod``) like ``round_float``."""
    if e is None:
        return round_float(s, grid, mode, bits, n, signed_zeros, overflow)
    if mode != "nearest" or grid.fallback is not None:
        return round_float(round_to_odd(s, e), grid, mode, bits, n)
    xc = torch.clamp(s, -grid.big, grid.big)
    rn = _nearest_signed(xc, grid)
    half = torch.clamp_min(ufp(xc) * 2.0**-grid.man, grid.qmin) * 0.5  # off the critical path
    tie = ((xc - rn).abs() == half) & (e != 0)
    return _overflow_and_sign(torch.where(tie, xc + torch.where(e > 0, half, -half), rn), s, grid)


def _nearest_signed(xc: torch.Tensor, grid: Grid) -> torch.Tensor:
    """xc rounded to the format's grid, ties to even, overflow not handled: Veltkamp's split in
    the normal range, one magic add in the subnormal range."""
    c = xc * grid.split
    m = grid.qmin * _MAGIC
    return torch.where(xc.abs() < grid.min_normal, (xc + m) - m, c - (c - xc))


def _overflow_and_sign(r: torch.Tensor, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``copysign`` by selects: inductor's CPU code calls libm for it, a call (and register
    spills) per vector."""
    r = r.abs()
    r = torch.where(r > grid.max, math.inf if grid.has_inf else math.nan, r)
    return _zero_sign(torch.where(x < 0, -r, r), x, grid)


def _zero_sign(r: torch.Tensor, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """r with the sign of the finite x where it is zero (``x * 0``), or +0 if the format has no -0."""
    return torch.where(r == 0, x * 0.0 if grid.neg_zero else 0.0, r)


def _finish(r: torch.Tensor, x: torch.Tensor, grid: Grid, mode: str) -> torch.Tensor:
    """Overflow, infinities and signs exactly as ``reference_quantize`` (unsaturated)."""
    if mode in ("toward_zero", "odd", "up", "down"):  # never round a finite value to inf
        clamp = x.abs() != torch.inf
        if mode in ("up", "down"):
            clamp = clamp & ((x < 0) if mode == "up" else (x > 0))
        r = torch.where((r > grid.max) & clamp, grid.max, r)
    return _overflow_and_sign(r, x, grid)
