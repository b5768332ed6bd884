"""Minifloat formats: IEEE-style, OCP "fn"/"fnuz", OCP MX element types, P3109 and E8M0."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from .table import lookup

__all__ = ["FloatFormat", "NanStyle", "p3109", "format_spec", "check_int"]

NanStyle = Literal["ieee", "fn", "negzero", "none"]
_NAN_STYLES = ("ieee", "fn", "negzero", "none")


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: sign, ``exp`` exponent bits, ``man`` trailing significand bits.

    Args:
        exp: exponent field width, 1..11.
        man: trailing significand width, 0..52.
        bias: exponent bias; default ``2**(exp-1) - 1``.
        subnormals: exponent field 0 encodes subnormals. Without them, field 0 encodes only
            zero (flush to zero) when ``man >= 1``; with ``man == 0`` it is the normal binade
            ``2**-bias`` and the format has no zero (E8M0).
        inf: the code below the high NaNs (or the top code) is +-infinity.
        nan: where NaNs live. ``"ieee"``: every code of the top exponent other than inf;
            ``"fn"``: only the all-ones magnitude code (OCP E4M3FN); ``"negzero"``: the code of
            -0 (fnuz, P3109); ``"none"``: no NaN (OCP MX elements).
        neg_zero: the format has -0; default: signed and ``nan != "negzero"``.
        signed: one sign bit, sign-magnitude.
        name: display name; not part of equality.
    """

    exp: int
    man: int
    bias: int | None = None
    subnormals: bool = True
    inf: bool = True
    nan: NanStyle = "ieee"
    neg_zero: bool | None = None
    signed: bool = True
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_int("exp", self.exp, 1, 11)
        check_int("man", self.man, 0, 52)
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exp - 1) - 1)
        check_int("bias", self.bias, -(2**11), 2**11)
        if self.nan not in _NAN_STYLES:
            raise ValueError(f"FloatFormat: nan={self.nan!r} is not one of {', '.join(_NAN_STYLES)}")
        if self.nan == "negzero" and not self.signed:
            raise ValueError("FloatFormat: nan='negzero' needs signed=True (it uses the -0 code)")
        default_nz = self.signed and self.nan != "negzero"
        if self.neg_zero is None:
            object.__setattr__(self, "neg_zero", default_nz)
        elif self.neg_zero and not default_nz:
            raise ValueError(
                "FloatFormat: neg_zero=True is impossible with "
                + ("signed=False" if not self.signed else "nan='negzero' (that code is the NaN)")
            )
        if self.bits > 64:
            raise ValueError(f"FloatFormat: {self.bits} bits (sign+exp+man) exceeds the allowed 64")
        top_field = self._max_code >> self.man  # exponent field of the largest binade
        lo, hi = top_field - 1023, (self.emin + self.bias) - self.man + 1074
        if not lo <= self.bias <= hi:
            raise ValueError(f"FloatFormat: bias={self.bias} puts values outside the float64 range; "
                             f"with exp={self.exp}, man={self.man} bias must be in [{lo}, {hi}]")
        if self._max_code < 0 or self._decode(self._max_code) <= 0:
            raise ValueError(
                f"FloatFormat: exp={self.exp}, man={self.man} with inf={self.inf}, nan={self.nan!r} "
                "leaves no positive finite value; widen exp or man"
            )

    # -- layout ---------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return int(self.signed) + self.exp + self.man

    @property
    def num_high_nans(self) -> int:
        """NaN codes at the top of the positive magnitude range (as in gfloat's FormatInfo)."""
        return {"ieee": 2**self.man - int(self.inf), "fn": 1}.get(self.nan, 0)

    @property
    def has_nan(self) -> bool:
        return self.nan != "none" and (self.nan != "ieee" or self.num_high_nans > 0)

    @property
    def has_zero(self) -> bool:
        return self.subnormals or self.man > 0

    @property
    def _max_code(self) -> int:
        return 2 ** (self.exp + self.man) - 1 - self.num_high_nans - int(self.inf)

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade."""
        return -self.bias if (self.man == 0 and not self.subnormals) else 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite binade, floor(log2(max))."""
        return math.frexp(self.max)[1] - 1

    def _decode(self, code: int) -> float:
        """Value of a non-negative magnitude code (no sign bit, no specials)."""
        ef, f = code >> self.man, code & (2**self.man - 1)
        if ef == 0 and self.subnormals:
            return math.ldexp(f, self.emin - self.man)
        if ef == 0 and self.man > 0:
            return 0.0  # flush-to-zero: field 0 holds only zero
        return math.ldexp(2**self.man + f, ef - self.bias - self.man)

    # -- limits ---------------------------------------------------------------------------
    @property
    def max(self) -> float:
        return self._decode(self._max_code)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (the smallest normal where there are no subnormals)."""
        return math.ldexp(1.0, self.emin - self.man) if self.subnormals else self.min_normal

    @property
    def eps(self) -> float:
        return math.ldexp(1.0, -self.man)

    @property
    def unit_roundoff(self) -> float:
        return math.ldexp(1.0, -self.man - 1)

    @property
    def is_finite_only(self) -> bool:
        """No infinities (NaN may still exist, as in E4M3FN)."""
        return not self.inf

    def values(self) -> torch.Tensor:
        """Every finite value, ascending, in float64 (-0 included where the format has it)."""
        if self.bits > 16:
            raise ValueError(f"values(): {self} has {self.bits} bits; enumeration is limited to 16")
        mags = sorted({self._decode(c) for c in range(self._max_code + 1)})
        neg = [-v for v in reversed(mags) if v != 0] if self.signed else []
        nz = [-0.0] if self.neg_zero else []
        return torch.tensor(neg + nz + mags, dtype=torch.float64)

    def __str__(self) -> str:
        return self.name if self.name is not None else format_spec(self)


def p3109(k: int, p: int, signed: bool = True, domain: Literal["extended", "finite"] = "extended") -> FloatFormat:
    """IEEE P3109 binary{k}p{p}: bias 2**(k-p-1) (signed) or 2**(k-p) (unsigned), no -0.

    Signed formats keep NaN in the -0 code, unsigned ones in the all-ones code;
    ``domain="extended"`` adds +-infinity just below it.
    """
    check_int("k", k, 2, 16)
    check_int("p", p, 1, k - 1 if signed else k)
    if domain not in ("extended", "finite"):
        raise ValueError(f"p3109: domain={domain!r} is not 'extended' or 'finite'")
    exp = k - p + (0 if signed else 1)
    name = f"p3109({k},{p}" + ("" if signed else ",unsigned") + ("" if domain == "extended" else ",finite") + ")"
    return FloatFormat(
        exp,
        p - 1,
        bias=2 ** (k - p - 1) if signed else 2 ** (k - p),
        inf=domain == "extended",
        nan="negzero" if signed else "fn",
        signed=signed,
        name=name,
    )


def format_spec(fmt: FloatFormat) -> str:
    """The spec ``formats.parse`` reads back to ``fmt``: ``eXmY`` with fn/fnuz shorthand and options."""
    ieee = {"bias": 2 ** (fmt.exp - 1) - 1, "subnormals": True, "inf": True, "nan": "ieee", "signed": True}
    for suffix, kw in (("fnuz", {"inf": False, "nan": "negzero", "bias": 2 ** (fmt.exp - 1)}),
                       ("fn", {"inf": False, "nan": "fn"}), ("", {})):
        defaults = {**ieee, **kw, "neg_zero": fmt.signed and fmt.nan != "negzero"}
        diffs = {k: getattr(fmt, k) for k, v in defaults.items() if getattr(fmt, k) != v}
        if suffix == "" or not diffs:
            opts = ",".join(f"{k}={str(v).lower()}" for k, v in diffs.items())
            bare = f"e{fmt.exp}m{fmt.man}{suffix}"
            # a bare name that a registered format holds (e8m0: the MX scale) would read back as that one
            registered = lookup(bare)
            return bare + (f"({opts})" if opts or (registered is not None and registered != fmt) else "")
    raise AssertionError("unreachable: the plain spec always applies")


def check_int(name: str, value: object, lo: int, hi: int) -> None:
    """A ValueError unless ``value`` is an int (not a bool) in ``[lo, hi]``: the formats' argument check."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} is out of range: expected an integer in [{lo}, {hi}]")
