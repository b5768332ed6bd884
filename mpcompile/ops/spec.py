"""What an emulated op computes: arithmetic specs and per-role quantization, as values.

Each spec is a frozen dataclass with a canonical string form that ``parse_*`` reads back
(and caches), so that custom ops take plain strings and a printed graph stays readable::

    ArithSpec:   mul=fp8_e5m2 acc=fp16 order=chunk(32)        (fields at their default omitted)
    QuantSpec:   fp8_e4m3:stochastic:tensor:sat:sr_bits=12   (format[:rounding][:scaling][:sat][:sr_bits=n][:axis=n])
    RoleFormats: input=fp8_e4m3 weight=fp8_e4m3:channel grad_output=fp8_e5m2
    Recompute:   tau=100.0 acc=fp32                             (tau, then the ArithSpec's fields)
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, fields
from typing import Mapping

import torch

from ..errors import SpecError
from ..formats import BlockFloat, BlockFormat, BlockMinifloat, FixedFormat, FloatFormat, Format, MXFormat, parse
from ..random_bits import COUNTER_BITS
from ..rounding import ROUNDING_MODES

__all__ = ["ArithSpec", "QuantSpec", "RoleFormats", "Recompute", "ROLES", "SCALINGS", "AMAX_HISTORY", "DELAYED_ROLES",
           "SpecError", "parse_arith", "parse_quant", "parse_roles", "parse_recompute", "MAX_WORK_MAN",
           "STREAM_MUL", "STREAM_ADD", "STREAM_KAHAN", "STREAM_BIAS", "STREAM_DIV"]

ROLES = ("input", "weight", "bias", "output", "grad_output", "grad_input", "grad_weight", "grad_bias")
SCALINGS = ("none", "tensor", "channel", "tensor_amax", "channel_amax", "tensor_delayed")
AMAX_HISTORY = 16  # amaxes a tensor_delayed role remembers (Transformer Engine's amax_history_len)
DELAYED_ROLES = ("input", "weight", "grad_output")  # the GEMM operands, whose amax is known before the op
# Sums and products are formed exactly in float64 and then rounded once, which is exact for
# every format whose significand leaves two guard bits in float64's 53 (round-to-odd bound).
MAX_WORK_MAN = 50
# Streams of ``random_bits.stream_seed``: which rounding of a reduction a random word serves.
# Step numbers: product k; the add of term k (sequential), chunk j (chunk(k)) or of pairwise
# node j at level l (K*l + j); Kahan's y, t, z, c roundings of term k.
STREAM_MUL, STREAM_ADD, STREAM_BIAS, STREAM_DIV = 0, 1, 5, 6
STREAM_KAHAN = (1, 2, 3, 4)
_ORDER = re.compile(r"^\s*(sequential|pairwise|chunk\s*\(\s*(\d+)\s*\))\s*$")


def _not_traced(cls: str) -> None:
    if torch.compiler.is_dynamo_compiling():  # dynamo would build the object with its defaults
        raise SpecError(f"{cls}(...) inside a torch.compile'd function: build it outside (e.g. in the "
                        f"module's __init__) or pass its string form, e.g. 'acc=fp16 order=chunk(32)'")


def _float_format(value: "Format | str", what: str) -> FloatFormat:
    fmt = parse(value)
    if not isinstance(fmt, FloatFormat):
        raise SpecError(f"{what}={value!s} is not a float format; accumulators and products need one "
                        f"(e.g. fp16, bf16, e5m10, fp8_e5m2)")
    if fmt.man > MAX_WORK_MAN or fmt.emax > 960 or fmt.emin - fmt.man < -960:
        raise SpecError(f"{what}={fmt}: emulated arithmetic runs exactly in float64 and supports formats "
                        f"with at most {MAX_WORK_MAN} mantissa bits and exponents within +-960")
    return fmt


def _rounding(value: str, what: str) -> str:
    if value not in ROUNDING_MODES:
        raise SpecError(f"{what}={value!r} is not one of {', '.join(ROUNDING_MODES)}")
    return value


@dataclass(frozen=True)
class ArithSpec:
    """How the products and the running sum of a dot product are rounded.

    Args:
        mul: format each product ``a*b`` is rounded to, from the exact product; None = exact.
        acc: format of the running sum; every add is rounded to it from the exact sum.
        order: ``sequential`` (acc = round(acc + p) for k = 0, 1, ...), ``chunk(k)`` (the
            products of each k-chunk summed in float64, then one rounded add into acc) or
            ``pairwise`` (a tree of rounded adds of neighbours, an odd last one carried up).
            Also ``("chunk", 32)``.
        rounding: rounding of acc (and of mul unless ``mul_rounding`` is given).
        mul_rounding: rounding of the products, if different.
        fma: each multiply-add is rounded once (the product is not rounded; mul must be None).
        kahan: compensated (Kahan) accumulation, every operation rounded in the acc format.
        sr_bits: random bits per stochastic rounding (default ``min(32, 51 - man)``).

    With ``mul=None, acc=fp32`` and everything else at its default the spec is *native*:
    ops call torch's own kernels, untouched.
    """

    mul: FloatFormat | None = None
    acc: FloatFormat = field(default="fp32")  # type: ignore[assignment]
    order: str = "sequential"
    rounding: str = "nearest"
    mul_rounding: str | None = None
    fma: bool = False
    kahan: bool = False
    sr_bits: int | None = None

    def __post_init__(self) -> None:
        _not_traced("ArithSpec")
        set_ = functools.partial(object.__setattr__, self)
        set_("acc", _float_format(self.acc, "acc"))
        if self.mul is not None:
            set_("mul", _float_format(self.mul, "mul"))
        set_("order", _canonical_order(self.order))
        set_("rounding", _rounding(self.rounding, "rounding"))
        set_("mul_rounding", _rounding(self.mul_rounding or self.rounding, "mul_rounding"))
        if self.fma and self.mul is not None:
            raise SpecError(f"ArithSpec: fma=True rounds each multiply-add once, so it takes no mul "
                            f"format (got mul={self.mul}); drop one of them")
        if self.kahan and self.order == "pairwise":
            raise SpecError("ArithSpec: kahan compensates a running sum; use order=sequential or chunk(k)")
        if self.sr_bits is not None and not (isinstance(self.sr_bits, int) and 1 <= self.sr_bits <= self.max_sr_bits):
            raise SpecError(f"ArithSpec: sr_bits={self.sr_bits!r} must be an integer in [1, {self.max_sr_bits}] "
                            f"for these formats (exact float64 emulation keeps 51 - man bits)")

    @property
    def chunk(self) -> int | None:
        """k of ``chunk(k)``, else None."""
        return int(self.order[6:-1]) if self.order.startswith("chunk") else None

    @property
    def max_sr_bits(self) -> int:
        return min(32, 51 - max(self.acc.man, self.mul.man if self.mul else 0))

    @property
    def stochastic(self) -> bool:
        """Whether any rounding of this arithmetic is stochastic (it then needs a seed)."""
        return "stochastic" in (self.rounding, self.mul_rounding if self.mul else None)

    def sr_bits_for(self, fmt: FloatFormat) -> int:
        """Random bits per stochastic rounding to ``fmt``."""
        return self.sr_bits or min(32, 51 - fmt.man)

    @property
    def is_native(self) -> bool:
        """True when this is the fp32 spec that runs torch's own kernels."""
        return self == _NATIVE

    def __str__(self) -> str:
        return self._text

    @functools.cached_property
    def _text(self) -> str:
        """``str(self)``, kept on the instance: every op call passes its specs to the custom op as
        strings. Per instance, not per value: fp16 and e5m10 are equal formats with their own names."""
        parts = [f"mul={self.mul}"] if self.mul is not None else []
        parts.append(f"acc={self.acc}")
        parts += [f"order={self.order}"] if self.order != "sequential" else []
        parts += [f"rounding={self.rounding}"] if self.rounding != "nearest" else []
        parts += [f"mul_rounding={self.mul_rounding}"] if self.mul_rounding != self.rounding else []
        parts += ["fma=true"] if self.fma else []
        parts += ["kahan=true"] if self.kahan else []
        parts += [f"sr_bits={self.sr_bits}"] if self.sr_bits is not None else []
        return " ".join(parts)


def _canonical_order(order: "str | tuple") -> str:
    if isinstance(order, tuple):
        if len(order) != 2 or order[0] != "chunk" or not isinstance(order[1], int):
            raise SpecError(f"order={order!r}: the tuple form is ('chunk', k)")
        order = f"chunk({order[1]})"
    m = _ORDER.match(str(order))
    if not m:
        raise SpecError(f"order={order!r} is not one of sequential, pairwise, chunk(k)")
    if m.group(2) is not None:
        if int(m.group(2)) < 1:
            raise SpecError(f"order={order!r}: the chunk size must be at least 1")
        return f"chunk({int(m.group(2))})"
    return m.group(1)


_NATIVE = ArithSpec()


@dataclass(frozen=True)
class Recompute:
    """Per-component mixed precision of a GEMM (El Arar, Filip, Mary and Riccietti 2025): every
    output component is computed in the op's forward arithmetic, and those whose condition
    number estimate (``ops.kappa.component_kappa``) exceeds ``tau`` again in ``forward``.

    Args:
        tau: the threshold, a positive number. ``inf`` keeps every component low; below 1 every
            component is recomputed (an exact kappa is at least 1, but an estimate from rounded
            values, or on a ReLU's flat side, can be lower: below 1 is defined to mean all).
        forward: the arithmetic of the recomputed components (default: torch's fp32).
    """

    tau: float
    forward: ArithSpec = _NATIVE

    def __post_init__(self) -> None:
        _not_traced("Recompute")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not self.tau > 0:
            raise SpecError(f"Recompute: tau={self.tau!r} must be a positive number (inf: every component in the "
                            f"low arithmetic; below 1: every component recomputed)")
        object.__setattr__(self, "tau", float(self.tau))
        if not isinstance(self.forward, ArithSpec):
            raise SpecError(f"Recompute: forward must be an ArithSpec, got {type(self.forward).__name__}")

    @property
    def keeps_all_low(self) -> bool:
        """tau = inf: no component is recomputed (the estimate is not even formed)."""
        return self.tau == math.inf

    @property
    def recomputes_all(self) -> bool:
        """tau < 1: every component is recomputed (the low arithmetic is not even run)."""
        return self.tau < 1

    def __str__(self) -> str:
        return f"tau={self.tau!r} {self.forward}"


@dataclass(frozen=True)
class QuantSpec:
    """How one role's tensor is quantized.

    Args:
        fmt: the format (any format ``quantize`` takes).
        rounding: a mode of ``quantize``.
        scaling: ``none``; ``tensor`` / ``channel``: scale by a power of two from the current
            amax so that amax lands in the format's top binade (the scaling itself is exact);
            ``tensor_amax`` / ``channel_amax``: scale by ``max / amax`` (not exact);
            ``tensor_delayed``: as ``tensor``, from the largest amax of the last
            ``AMAX_HISTORY`` calls instead of the current one (Transformer Engine's delayed
            scaling: a tensor that grows past it overflows, or saturates with ``saturate``).
        saturate: overflow goes to +-max instead of inf/NaN.
        sr_bits: random bits per value of ``stochastic`` rounding, at most ``COUNTER_BITS``
            (None: ``rounding.default_sr_bits``, the bits a float32 value loses).
        axis: the role tensor's axis that ``channel`` scales run along and that a block
            format's blocks run along (None: the op's own, see ``quantize_role``).
    """

    fmt: Format
    rounding: str = "nearest"
    scaling: str = "none"
    saturate: bool = False
    sr_bits: int | None = None
    axis: int | None = None

    def __post_init__(self) -> None:
        _not_traced("QuantSpec")
        object.__setattr__(self, "fmt", parse(self.fmt))
        _rounding(self.rounding, "rounding")
        if self.scaling not in SCALINGS:
            raise SpecError(f"scaling={self.scaling!r} is not one of {', '.join(SCALINGS)}")
        if isinstance(self.fmt, BlockFormat) and self.scaling != "none":
            raise SpecError(f"scaling={self.scaling}: block formats ({self.fmt}) carry their own scales; use none")
        if self.sr_bits is not None and not (type(self.sr_bits) is int and 1 <= self.sr_bits <= COUNTER_BITS):
            raise SpecError(f"sr_bits={self.sr_bits!r} must be an integer in [1, {COUNTER_BITS}] "
                            f"(the bits of one counter-based random word)")
        if self.axis is not None and not (type(self.axis) is int and -64 <= self.axis < 64):
            raise SpecError(f"axis={self.axis!r} must be an integer (a dimension of the role's tensor)")

    def __str__(self) -> str:
        parts = [str(self.fmt)]
        parts += [self.rounding] if self.rounding != "nearest" else []
        parts += [self.scaling] if self.scaling != "none" else []
        parts += ["sat"] if self.saturate else []
        parts += [f"sr_bits={self.sr_bits}"] if self.sr_bits is not None else []
        return ":".join(parts + ([f"axis={self.axis}"] if self.axis is not None else []))


@dataclass(frozen=True)
class RoleFormats:
    """Quantization per role of an op; roles not named are left as they are."""

    specs: tuple[tuple[str, QuantSpec], ...] = ()

    @classmethod
    def of(cls, formats: "RoleFormats | Mapping[str, Format | str | QuantSpec | None] | str | None") -> "RoleFormats":
        """Build from a mapping role -> format / ``QuantSpec`` string / ``QuantSpec``."""
        if isinstance(formats, RoleFormats):
            return formats
        if formats is None:
            return cls()
        if isinstance(formats, str):
            return parse_roles(formats)
        specs = []
        for role, value in formats.items():
            if role not in ROLES:
                raise SpecError(f"formats: unknown role {role!r}; roles are {', '.join(ROLES)}")
            if value is not None:
                spec = value if isinstance(value, QuantSpec) else parse_quant(value)
                if spec.scaling == "tensor_delayed" and role not in DELAYED_ROLES:
                    raise SpecError(f"formats: {role}={spec}: tensor_delayed scaling is for the GEMM operands "
                                    f"({', '.join(DELAYED_ROLES)}); use tensor for {role}")
                specs.append((role, spec))
        return cls(tuple(sorted(specs, key=lambda s: ROLES.index(s[0]))))

    def get(self, role: str) -> QuantSpec | None:
        return dict(self.specs).get(role)

    def __str__(self) -> str:
        return " ".join(f"{role}={spec}" for role, spec in self.specs)


for _cls in (ArithSpec, QuantSpec, RoleFormats, Recompute, FloatFormat, FixedFormat, MXFormat, BlockFloat,
             BlockMinifloat):
    torch.utils._pytree.register_constant(_cls)  # torch.compile treats specs and formats as constants


@functools.lru_cache(maxsize=4096)
def parse_arith(text: str) -> ArithSpec:
    """Read ``str(ArithSpec)`` back: space-separated ``key=value`` fields."""
    kwargs: dict = {}
    names = {f.name for f in fields(ArithSpec)}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise SpecError(f"arithmetic spec {text!r}: {item!r} is not key=value with a key among {', '.join(sorted(names))}")
        if key in ("fma", "kahan"):
            if value not in ("true", "false"):
                raise SpecError(f"arithmetic spec {text!r}: {key} must be true or false, not {value!r}")
            kwargs[key] = value == "true"
        elif key == "sr_bits":
            kwargs[key] = int(value) if value.isdigit() else value
        else:
            kwargs[key] = None if value == "None" else value
    return ArithSpec(**kwargs)


def _quant_from_string(text: str) -> QuantSpec:
    head, *opts = text.strip().split(":")
    kwargs: dict = {}
    for opt in opts:
        name, sep, value = opt.partition("=")
        key = name if sep and name in ("sr_bits", "axis") else "rounding" if opt in ROUNDING_MODES else \
            "scaling" if opt in SCALINGS else "saturate" if opt == "sat" else None
        if key is None or key in kwargs or (sep and not re.fullmatch(r"-?\d+", value)):
            raise SpecError(f"role spec {text!r}: {opt!r} is not a rounding mode, a scaling "
                            f"({', '.join(SCALINGS)}), 'sat', sr_bits=<n> or axis=<n>, or repeats one")
        kwargs[key] = int(value) if sep else True if key == "saturate" else opt
    return QuantSpec(head, **kwargs)


@functools.lru_cache(maxsize=4096)
def _parse_quant_cached(text: str) -> QuantSpec:
    return _quant_from_string(text)


def parse_quant(value: "Format | str | QuantSpec") -> QuantSpec:
    """A ``QuantSpec`` from itself, a format, or ``format[:rounding][:scaling][:sat]``."""
    if isinstance(value, QuantSpec):
        return value
    return _parse_quant_cached(value) if isinstance(value, str) else QuantSpec(value)


@functools.lru_cache(maxsize=4096)
def parse_roles(text: str) -> RoleFormats:
    """Read ``str(RoleFormats)`` back: space-separated ``role=quantspec``."""
    pairs = {}
    for item in text.split():
        role, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"role formats {text!r}: {item!r} is not role=format")
        pairs[role] = value
    return RoleFormats.of(pairs)



@functools.lru_cache(maxsize=1024)
def parse_recompute(text: str) -> Recompute:
    """Read ``str(Recompute)`` back: ``tau=<float>`` followed by the fields of ``parse_arith``."""
    head, _, rest = text.strip().partition(" ")
    key, sep, value = head.partition("=")
    try:
        tau = float(value)
    except ValueError:
        tau = None
    if key != "tau" or not sep or tau is None:
        raise SpecError(f"recompute spec {text!r} must start with tau=<number>, e.g. 'tau=100.0 acc=fp32'")
    return Recompute(tau, parse_arith(rest or str(_NATIVE)))
