"""``quantize``: what a value becomes in a format, to the last bit.

The semantics are gfloat's ``round_float`` (all of its modes, saturation, special values),
written as vectorised torch code over the bits of float32/float64 so that it runs on any
device without a float64 detour or a host synchronisation. Rounding happens on the
magnitude: ``|x| = y * 2**qe`` with ``qe`` the quantum exponent of ``x`` in the format, then
``y`` is rounded to an integer by the mode, with exact tests on ``y - floor(y)``.

Other quantize kernels (the fused CPU path, Triton kernels) register with
``register_quantize_kernel`` and must be bit-identical to ``reference_quantize``.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch

from .backends import PLUGINS, current_backend, load_plugins, resolve_backend, use_backend
from .formats import BlockFormat, CodebookFormat, FixedFormat, FloatFormat, Format, parse
from .formats.block_format import SCALE_EXP_MAX, SCALE_EXP_MIN
from .formats.codebook_codes import quantize_codebook
from .random_bits import COUNTER_BITS, counter_bits

__all__ = [
    "Rounding", "ROUNDING_MODES", "quantize", "QuantPlan", "plan_quantize", "reference_quantize",
    "register_quantize_kernel", "set_quantize_kernel", "get_quantize_kernel", "default_sr_bits",
    "register_backend", "set_quantize_backend", "get_quantize_backend",  # deprecated spellings
]

Rounding = Literal["nearest", "nearest_away", "toward_zero", "up", "down", "odd", "stochastic"]
ROUNDING_MODES: tuple[str, ...] = ("nearest", "nearest_away", "toward_zero", "up", "down", "odd", "stochastic")


@dataclass(frozen=True)
class QuantPlan:
    """Everything about a quantization that is fixed before looking at data.

    Equal plans run the same code, so quantize kernels may cache compiled code by plan.
    Per-format numbers are not in the plan but in ``QuantParams`` (tensors), so that one
    compiled kernel serves a whole family of formats.
    """

    kind: Literal["float", "fixed"]
    rounding: str
    saturate: bool
    dtype: torch.dtype  # working dtype: float32 or float64
    signed: bool
    has_inf: bool
    has_zero: bool
    has_nz: bool
    ftz: bool  # no subnormals: values under min_normal round between 0 and min_normal
    parity_by_exponent: bool  # man == 0: ties-to-even looks at the exponent code
    exact_exponent: bool  # the format's grid reaches below the working dtype's normal range
    finer_than_input: bool  # the format's grid can be finer than the input's
    one_step_scale: bool  # every 2**k needed fits one power of two of the working dtype
    sr_int_path: bool  # stochastic: more random bits than the working float holds exactly
    seeded: bool = False  # stochastic: ``bits`` is a 0-d seed of counter_bits, not the bits
    block_size: int | None = None
    axis: int = -1


class QuantParams(NamedTuple):
    """Per-format numbers, as 0-d tensors on the input's device."""

    man: torch.Tensor  # int32: trailing significand bits (float) / fraction bits (fixed)
    emin: torch.Tensor  # int32: exponent of the smallest normal binade (float)
    bias: torch.Tensor  # int32
    max: torch.Tensor  # largest finite magnitude (positive side)
    neg_max: torch.Tensor  # largest finite magnitude on the negative side
    min_pos: torch.Tensor  # smallest positive value
    elem_emax: torch.Tensor  # int32: emax of a block's element format
    sr_bits: torch.Tensor  # int64: random bits per value
    # derived from the above, so that eager code scales by one multiply instead of building 2**k
    quantum: torch.Tensor  # 2**-man, a fixed format's grid step (1 for float formats)
    sr_one: torch.Tensor  # 2**sr_bits, in the working dtype
    sr_mask: torch.Tensor  # int64: 2**sr_bits - 1


# -- dtype helpers ----------------------------------------------------------------------------
_DT = {torch.float32: (torch.int32, 23, 127), torch.float64: (torch.int64, 52, 1023)}


def _exponent(a: torch.Tensor, exact: bool) -> torch.Tensor:
    """floor(log2(a)) for a >= 0 from the bits: exact for normal a; for zero and subnormal a,
    -bias unless ``exact``, which normalises subnormals first (one more pass)."""
    itype, man, bias = _DT[a.dtype]
    e = (a.view(itype) >> man).sub_(bias)  # in the integer width of a's dtype
    if exact:
        shift = man + 1  # 2**shift makes every subnormal normal
        return torch.where(e == -bias, _exponent(a * 2.0**shift, False) - shift, e)
    return e


def _pow2(k: torch.Tensor, dtype: torch.dtype, negate: bool) -> torch.Tensor:
    """2**k (2**-k if negate), exact, for integer k inside the normal exponent range of dtype."""
    itype, man, bias = _DT[dtype]
    k = k.to(itype)
    return (bias - k if negate else k + bias).bitwise_left_shift_(man).view(dtype)


def _scale(v: torch.Tensor, k: torch.Tensor, one_step: bool, negate: bool = False, out=None) -> torch.Tensor:
    """v * 2**k (2**-k if negate), exact wherever the result is representable.

    Two steps of 2**(k/2) reach the whole exponent range where 2**k itself would overflow.
    ``out`` may be ``v`` when v is a temporary (the eager path then allocates less).
    """
    if one_step:
        return torch.mul(v, _pow2(k, v.dtype, negate), out=out)
    h = k >> 1
    return torch.mul(v, _pow2(h, v.dtype, negate), out=out).mul_(_pow2(k - h, v.dtype, negate))


# -- the kernel ---------------------------------------------------------------------------------
def _round_magnitude(a, neg, qe, plan: QuantPlan, p: QuantParams, bits, bias):
    """Round |x| = a to a multiple of 2**qe by plan.rounding; returns the rounded magnitude.

    ``qe`` None means the fixed format's own grid (``p.quantum``). ``bias`` turns qe into the
    biased exponent code (the parity rule of man == 0 formats).
    """
    one_step = plan.one_step_scale
    if qe is None:
        def down(v, out=None): return torch.mul(v, p.quantum, out=out)
        y = torch.div(a, p.quantum)  # exact: a power of two
    else:
        def down(v, out=None): return _scale(v, qe, one_step, out=out)
        y = _scale(a, qe, one_step, negate=True)
    mode = plan.rounding
    if mode == "nearest" and not plan.parity_by_exponent:
        return down(y.round_(), out=y)  # torch.round is ties-to-even
    if mode == "toward_zero":
        return down(y.floor_(), out=y)
    fl = torch.floor(y)
    delta = y.sub_(fl)  # exact
    if mode in ("odd", "up", "down"):  # far below a coarse quantum, y underflows to 0: still inexact
        inexact = (delta > 0) | ((fl == 0) & (a > 0))
    if mode in ("nearest", "odd"):
        if plan.parity_by_exponent:  # p == 1: the code's parity is the exponent's (as gfloat)
            is_odd = (fl != 0) & (((qe + bias) & 1) == 1)
        else:
            is_odd = torch.remainder(fl, 2) == 1
        away = (delta > 0.5) | ((delta == 0.5) & is_odd) if mode == "nearest" else inexact & ~is_odd
    elif mode == "nearest_away":
        away = delta >= 0.5
    elif mode == "up":
        away = inexact & ~neg
    elif mode == "down":
        away = inexact & neg
    else:  # stochastic, as gfloat: delta rounded to sr_bits bits (ties to even), then compared
        bits = torch.bitwise_and(bits, p.sr_mask)  # the low sr_bits bits (functions, not operators:
        # a Tensor operator's Python wrapper costs as much as the op on a small tensor)
        d = delta.mul_(p.sr_one).round_()
        if plan.sr_int_path:
            away = d.to(torch.int64).add_(bits) > p.sr_mask
        else:  # d + bits < 2**(sr_bits + 1), exact or rounded below it, so this carry is 0 or 1
            # (float arithmetic: faster than a bool mask); NaN where y is not finite, and then fl is
            away = d.add_(bits).div_(p.sr_one).floor_().nan_to_num_(0.0)
    return down(fl.add_(away), out=fl)


def _round_values(x, plan: QuantPlan, p: QuantParams, bits, scale_exp=None):
    """Round every element of x (working dtype) to the format; scale_exp shifts it by 2**s."""
    a = x.abs()
    clamp_signed = plan.saturate and plan.signed  # clamps x's signed value: no sign mask needed
    neg = None if clamp_signed and plan.rounding not in ("up", "down") else torch.signbit(x)
    if plan.kind == "float":
        e = _exponent(a, plan.exact_exponent)
        emin = p.emin if scale_exp is None else p.emin + scale_exp
        if plan.ftz:
            qe = torch.where(e < emin, emin, e - p.man)
        else:
            qe = torch.maximum(e, emin) - p.man
        if plan.finer_than_input:  # never round below the input's own grid
            _, dman, dbias = _DT[a.dtype]
            qe = torch.maximum(qe, torch.clamp_min(e, 1 - dbias) - dman)
    else:
        qe = scale_exp - p.man if scale_exp is not None else None if plan.one_step_scale else -p.man
    bias = p.bias if scale_exp is None else p.bias - scale_exp  # codes of the unscaled element
    r = _round_magnitude(a, neg, qe, plan, p, bits, bias)
    if not plan.signed:  # an unsigned format's only non-positive value is 0: negative x is out of
        # range unless its magnitude rounds to 0 (read before overflow, which clamps an unsigned
        # fixed format's negatives to 0); in a format without zero (E8M0) every negative x is
        out = neg & ((r > 0) if plan.has_zero else (a > 0))

    hi, lo = p.max, p.neg_max  # the largest magnitudes on either side
    if scale_exp is not None:
        hi, lo = _scale(hi, scale_exp, False), _scale(lo, scale_exp, False)
    if clamp_signed:  # lo >= hi (a two's-complement grid's negative side is the longer): the
        r = torch.minimum(r, lo, out=r)  # positive side is clamped once signed, below; NaN stays NaN
    else:
        amax = torch.where(neg, lo, hi) if plan.kind == "fixed" else hi
        if plan.saturate:
            r = torch.minimum(r, amax, out=r)
        else:
            if plan.rounding in ("toward_zero", "odd", "up", "down"):  # never round a finite value to inf
                clamp = torch.isfinite(a)
                if plan.rounding in ("up", "down"):
                    clamp &= neg if plan.rounding == "up" else ~neg
                r = torch.where((r > amax) & clamp, amax, r)
            r = r.masked_fill_(r > amax, torch.inf if plan.has_inf else torch.nan)
    if not plan.has_zero:  # E8M0: nothing below min_pos, and zero is not a value
        r = torch.where(a == 0, p.min_pos if plan.saturate else torch.nan, torch.maximum(r, p.min_pos))
    if not plan.signed:  # a negative value rounding to 0 gives +0 (r is a magnitude)
        low = p.min_pos if not plan.has_zero else torch.zeros_like(p.min_pos)
        return torch.where(out, low if plan.saturate else torch.nan, r)
    if clamp_signed and not plan.has_nz and scale_exp is None:  # r <= lo, finite (a block's may not be)
        # r * sign(x) computed as r - r (1 - sign(x)): exact for finite r, and +0 where r is 0,
        # so no -0 to mask out afterwards (a mask costs several times these float ops)
        r = r.sub_(torch.sign(x).neg_().add_(1).mul_(r))
        return torch.minimum(r, hi, out=r)
    r = torch.copysign(r, x, out=r)
    if clamp_signed and plan.kind == "fixed":
        r = torch.minimum(r, hi, out=r)
    return r if plan.has_nz else r.masked_fill_(r.eq(0), 0.0)


def _round_blocks(x, plan: QuantPlan, p: QuantParams, bits):
    """Block-scaled rounding: s = clip(floor(log2(amax)) - elem_emax) per block, elements saturate."""
    bs, axis = plan.block_size, plan.axis
    n = x.shape[axis]
    pad = (-n) % bs

    def blocked(t):  # (..., n) along axis -> (..., n_blocks, bs), the tail padded with zeros
        t = t.movedim(axis, -1)
        t = torch.nn.functional.pad(t, (0, pad)) if pad else t
        return t.reshape(*t.shape[:-1], (n + pad) // bs, bs).contiguous()  # the kernel writes out= in place

    xb = blocked(x)
    amax = xb.abs().amax(-1, keepdim=True)
    log2 = _exponent(amax, exact=True)  # exact also for subnormal amax
    s = torch.clamp(log2 - p.elem_emax, SCALE_EXP_MIN, SCALE_EXP_MAX)
    s = torch.where(amax == 0, SCALE_EXP_MIN, torch.where(torch.isinf(amax), SCALE_EXP_MAX, s))
    r = _round_values(xb, plan, p, None if bits is None else blocked(bits), scale_exp=s)
    r = torch.where(torch.isnan(amax), torch.nan, r)
    return r.reshape(*r.shape[:-2], n + pad)[..., :n].movedim(-1, axis)


def reference_quantize(x: torch.Tensor, plan: QuantPlan, params: QuantParams, bits: torch.Tensor | None) -> torch.Tensor:
    """The reference kernel: eager torch. ``x`` is in ``plan.dtype``; for stochastic rounding the
    low ``sr_bits`` bits of each entry of ``bits`` (an integer tensor of x's shape) are its random
    bits, or, if ``plan.seeded``, ``bits`` is the 0-d seed of ``counter_bits``."""
    if plan.seeded:
        bits = counter_bits(bits, x.shape)
    if plan.block_size is not None:
        return _round_blocks(x, plan, params, bits)
    return _round_values(x, plan, params, bits)


# -- plans ----------------------------------------------------------------------------------------
def default_sr_bits(fmt: Format, dtype: torch.dtype = torch.float32) -> int:
    """Random bits per value for stochastic rounding when none are given: the bits a value in
    the format's normal range loses (``23 - man`` for float32 input), so that P(round away)
    is exactly the fractional distance there; at least 1."""
    elem = fmt.element if isinstance(fmt, BlockFormat) else fmt
    dman = _DT[_work_dtype(dtype)][1]
    return max(1, dman - elem.man) if isinstance(elem, FloatFormat) else dman


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=1024)
def plan_quantize(fmt: Format, rounding: str, saturate: bool, dtype: torch.dtype, sr_bits: int,
                  seeded: bool = False, device: torch.device = torch.device("cpu")) -> tuple[QuantPlan, QuantParams]:
    """The static plan and the per-format numbers (tensors on ``device``) of one quantization.

    Cached: a call of ``quantize`` with a known format costs no planning.
    """
    work = _work_dtype(dtype)
    _, dman, dbias = _DT[work]
    block = fmt if isinstance(fmt, BlockFormat) else None
    elem = fmt.element if block else fmt
    common = dict(rounding=rounding, saturate=saturate or block is not None, dtype=work,
                  block_size=block.block_size if block else None, axis=block.axis if block else -1,
                  sr_int_path=sr_bits > (24 if work == torch.float32 else 53), seeded=seeded)
    if isinstance(elem, FixedFormat):
        plan = QuantPlan(kind="fixed", signed=elem.signed, has_inf=False, has_zero=True, has_nz=False,
                         ftz=False, parity_by_exponent=False, exact_exponent=False, finer_than_input=False,
                         one_step_scale=block is None and abs(elem.fl) < dbias, **common)
        nums = dict(man=elem.fl, emin=0, bias=0, max=_largest_held(work, elem, elem.max), neg_max=_largest_held(work, elem, abs(elem.min)),
                    min_pos=elem.min_subnormal)
    else:
        emin_lo = elem.emin + (SCALE_EXP_MIN if block else 0)  # a block scale shifts the range down
        qe_lo = emin_lo - elem.man
        qe_hi = dbias + 1 - elem.man
        plan = QuantPlan(kind="float", signed=elem.signed, has_inf=elem.inf, has_zero=elem.has_zero,
                         has_nz=bool(elem.neg_zero), ftz=not elem.subnormals and elem.man > 0,
                         parity_by_exponent=elem.man == 0, exact_exponent=emin_lo < 1 - dbias,
                         finer_than_input=elem.man > dman or qe_lo < 1 - dbias - dman,
                         one_step_scale=block is None and -dbias < qe_lo and qe_hi < dbias,
                         **common)
        nums = dict(man=elem.man, emin=elem.emin, bias=elem.bias, max=_largest_held(work, elem, elem.max),
                    neg_max=_largest_held(work, elem, elem.max), min_pos=elem.min_subnormal)
    ints = dict(man=torch.int32, emin=torch.int32, bias=torch.int32, elem_emax=torch.int32, sr_bits=torch.int64,
                sr_mask=torch.int64)
    quantum = 2.0 ** -elem.fl if plan.kind == "fixed" and plan.one_step_scale else 1.0
    nums.update(elem_emax=elem.emax, sr_bits=sr_bits, quantum=quantum, sr_one=2.0**sr_bits, sr_mask=2**sr_bits - 1)
    return plan, QuantParams(**{k: torch.tensor(v, dtype=ints.get(k, work), device=device) for k, v in nums.items()})


def _largest_held(dtype: torch.dtype, fmt: FloatFormat | FixedFormat, v: float) -> float:
    """The largest value of fmt not above v that dtype holds: what saturation clamps to when
    the format's max is beyond the dtype (e11m2 in float32) or not one of its values (fixed(32,16))."""
    while True:
        t = torch.tensor(v, dtype=torch.float64).to(dtype)
        held = float(t if float(t) <= v else torch.nextafter(t, torch.zeros_like(t)))
        e = math.frexp(held)[1] - 1
        quantum = math.ldexp(1.0, -fmt.fl if isinstance(fmt, FixedFormat) else max(e, fmt.emin) - fmt.man)
        on_grid = math.floor(held / quantum) * quantum  # exact: quantum is a power of two
        if on_grid == v:
            return v
        v = on_grid


# -- quantize kernels ------------------------------------------------------------------------------
# A quantize kernel is one implementation of ``reference_quantize``'s contract. "Backend" is the
# op-level word (``mpcompile.backends``: auto, torch, triton); under ``torch`` the kernel is the
# eager reference or, for large CPU tensors, the fused one; under ``triton`` the Triton one.
Kernel = Callable[[torch.Tensor, QuantPlan, QuantParams, "torch.Tensor | None"], torch.Tensor]
# a kernel that writes into a given contiguous tensor of x's shape and the plan's dtype (its last argument)
KernelInto = Callable[[torch.Tensor, QuantPlan, QuantParams, "torch.Tensor | None", torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _QuantizeKernel:
    name: str
    kernel: Kernel
    accepts: Callable[[torch.Tensor, QuantPlan], bool]
    into: KernelInto | None = None


_KERNELS: dict[str, _QuantizeKernel] = {"reference": _QuantizeKernel("reference", reference_quantize, lambda x, plan: True)}
_ENV = "MPCOMPILE_QUANTIZE_KERNEL"
_OLD_ENV = "MPCOMPILE_QUANTIZE_BACKEND"  # deprecated spelling, still read
_forced: str | None = None


def register_quantize_kernel(name: str, kernel: Kernel, accepts: Callable[[torch.Tensor, QuantPlan], bool],
                             into: KernelInto | None = None) -> None:
    """Add a quantize kernel; in ``auto`` mode the most recently registered one that accepts a call runs it.

    mpcompile's own kernels (``fused``, ``triton``, in ``mpcompile/codegen/``) register when
    ``mpcompile.backends.load_plugins`` imports them; the ``torch`` backend's are loaded before a
    kernel registered here, so that it comes after them and takes precedence.

    Args:
        name: the name ``set_quantize_kernel`` and ``MPCOMPILE_QUANTIZE_KERNEL`` use.
        kernel: same contract as ``reference_quantize``, and bit-identical to it.
        accepts: whether the kernel should take this input and plan when not forced.
        into: the same kernel writing into a given tensor (``quantize``'s ``out``), where it
            saves the allocation; None: ``out`` takes a copy of the kernel's result.
    """
    load_plugins("torch")
    _KERNELS[name] = _QuantizeKernel(name, kernel, accepts, into)


def _known(name: str) -> bool:
    """Whether a kernel is registered as ``name``, loading the backends' plug-ins as far as needed."""
    for backend in PLUGINS:
        if name in _KERNELS:
            break
        load_plugins(backend)
    return name in _KERNELS


def set_quantize_kernel(name: str | None) -> None:
    """Force a quantize kernel for every ``quantize`` call (``"reference"``: eager torch,
    ``"fused"``: one C++ or inductor-compiled pass over memory, ``"triton"``), or ``None``/``"auto"``
    to choose per call by the op backend. Overrides ``MPCOMPILE_QUANTIZE_KERNEL``."""
    global _forced
    if name not in (None, "auto") and not _known(name):
        raise ValueError(f"set_quantize_kernel: unknown quantize kernel {name!r}; known: auto, {', '.join(_KERNELS)}")
    _forced = None if name == "auto" else name


def get_quantize_kernel() -> str:
    """The forced quantize kernel's name (``set_quantize_kernel``, else the environment variable
    ``MPCOMPILE_QUANTIZE_KERNEL``), or ``"auto"``."""
    if _forced:
        return _forced
    env, name = _ENV, os.environ.get(_ENV)  # read on every call (one lookup when set): tests and users change it
    if name is None:
        env, name = _OLD_ENV, os.environ.get(_OLD_ENV)
        if name is None:
            return "auto"
        warnings.warn(f"{_OLD_ENV} is deprecated: set {_ENV} instead", DeprecationWarning, stacklevel=2)
    if name != "auto" and not _known(name):
        raise ValueError(f"{env}={name!r} is not a quantize kernel; use auto, {', '.join(_KERNELS)}")
    return name


def register_backend(name: str, kernel: Kernel, accepts: Callable[[torch.Tensor, QuantPlan], bool]) -> None:
    """Deprecated spelling of ``register_quantize_kernel``."""
    warnings.warn("register_backend is deprecated: use register_quantize_kernel", DeprecationWarning, stacklevel=2)
    register_quantize_kernel(name, kernel, accepts)


def set_quantize_backend(name: str | None) -> None:
    """Deprecated spelling of ``set_quantize_kernel``."""
    warnings.warn("set_quantize_backend is deprecated: use set_quantize_kernel", DeprecationWarning, stacklevel=2)
    set_quantize_kernel(name)


def get_quantize_backend() -> str:
    """Deprecated spelling of ``get_quantize_kernel``."""
    warnings.warn("get_quantize_backend is deprecated: use get_quantize_kernel", DeprecationWarning, stacklevel=2)
    return get_quantize_kernel()


def _select(x: torch.Tensor, plan: QuantPlan) -> _QuantizeKernel:
    """A forced quantize kernel, else the op backend's (``use_backend``) for x's device: ``triton``
    takes float32 plans, ``torch`` the most recently registered kernel other than triton that accepts."""
    name = get_quantize_kernel()
    if name != "auto":
        return _KERNELS[name]
    if resolve_backend(current_backend(), x.device) == "triton" and "triton" in _KERNELS:  # loads the plug-ins
        if plan.dtype == torch.float32:
            return _KERNELS["triton"]
    load_plugins("torch")  # the fused CPU kernel also serves the torch reference's large tensors under triton
    for kernel in reversed(list(_KERNELS.values())):
        if kernel.name != "triton" and kernel.accepts(x, plan):
            return kernel
    return _KERNELS["reference"]


# -- the public function -----------------------------------------------------------------------
def quantize(
    x: torch.Tensor,
    fmt: "Format | str",
    rounding: Rounding = "nearest",
    *,
    saturate: bool = False,
    sr_bits: int | None = None,
    random_bits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round every element of ``x`` to a value of ``fmt``.

    Args:
        x: float64, float32, float16 or bfloat16 tensor (the last two are computed in float32).
        fmt: a format or a name/spec that ``mpcompile.formats.parse`` reads.
        rounding: one of ``ROUNDING_MODES``: ``nearest`` (ties to even), ``nearest_away``,
            ``toward_zero``, ``up``, ``down``, ``odd`` (truncate, then set the last bit if inexact)
            or ``stochastic``.
        saturate: finite overflow and infinities become +-max instead of inf (or NaN where
            the format has no inf). Block formats always saturate their elements.
        sr_bits: random bits per value for ``stochastic`` (default ``default_sr_bits``).
        random_bits: integer tensor of x's shape with values in ``[0, 2**sr_bits)`` (higher bits
            are ignored: checking them would cost a host synchronisation); replaces the
            generator, so results can be checked against other implementations.
        generator: draws the seed of the random bits (default: torch's global generator).
            The bits are ``counter_bits(seed)``: the same on every backend and device.
        backend: ``auto``, ``torch`` or ``triton`` (``mpcompile.backends``); default: the
            enclosing ``use_backend``'s, else ``auto``. ``set_quantize_kernel`` overrides it.
        out: a contiguous tensor of x's shape, dtype and device that takes the result (and is
            returned), as torch's ``out=``: memory a caller reuses is not faulted in afresh.

    Returns:
        A tensor of x's shape, dtype and device whose finite entries are values of ``fmt``. It
        carries no gradient (rounding has none): ``mpcompile.ops.quant`` is the straight-through
        quantizer.

    A block-wise codebook format (``blockwise(dynamic8,256)``) rounds to the nearest entry as
    bitsandbytes does (``formats.codebook_codes``), in float32; it takes ``nearest`` only and
    ignores ``saturate`` (its absmax scale never overflows).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"quantize: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    x = x.detach()
    fmt = parse(fmt)
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"quantize: rounding={rounding!r} is not one of {', '.join(ROUNDING_MODES)}")
    if isinstance(fmt, CodebookFormat):
        if rounding != "nearest":
            raise ValueError(f"quantize: {fmt} rounds to the nearest codebook entry only (as bitsandbytes does), not "
                             f"{rounding!r}; use rounding='nearest' (in a policy: optimizer.update_rounding: nearest)")
    if isinstance(fmt, BlockFormat) and not -x.dim() <= fmt.axis < max(x.dim(), 1):
        raise ValueError(f"quantize: {fmt} blocks run along axis {fmt.axis}, but x has {x.dim()} dims")
    bits = None
    n = default_sr_bits(fmt, x.dtype) if sr_bits is None else sr_bits
    if rounding == "stochastic":
        if not isinstance(n, int) or not 1 <= n <= 62:
            raise ValueError(f"quantize: sr_bits={sr_bits!r} must be an integer in [1, 62]")
        bits = _random_bits(x, n, random_bits, generator)
    elif random_bits is not None or sr_bits is not None:
        raise ValueError(f"quantize: random_bits and sr_bits apply only to rounding='stochastic', not {rounding!r}")
    if out is not None and not (out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
                                and out.is_contiguous()):
        raise ValueError(f"quantize: out must be a contiguous tensor of x's shape {tuple(x.shape)}, dtype {x.dtype} "
                         f"and device {x.device}; got {tuple(out.shape)}, {out.dtype}, {out.device}")
    if isinstance(fmt, CodebookFormat):
        y = quantize_codebook(x, fmt)
        return y if out is None else out.copy_(y)
    seeded = bits is not None and random_bits is None and n <= COUNTER_BITS
    plan, params = plan_quantize(fmt, rounding, saturate, x.dtype, n, seeded, x.device)
    xw = x.to(plan.dtype).contiguous()  # kernels write out= in place, which dynamo wants contiguous
    with use_backend(backend) if backend is not None else contextlib.nullcontext():
        kernel = _select(xw, plan)
        if out is not None and kernel.into is not None and out.dtype == plan.dtype:
            return kernel.into(xw, plan, params, bits, out)
        y = kernel.kernel(xw, plan, params, bits).to(x.dtype)
    return y if out is None else out.copy_(y)


def _random_bits(x: torch.Tensor, n: int, random_bits: torch.Tensor | None, generator) -> torch.Tensor:
    """The explicit bits, checked; else a seed for counter_bits (one draw from the generator),
    or for more than 32 bits a tensor of them from the generator."""
    if random_bits is None:
        high = 2**COUNTER_BITS if n <= COUNTER_BITS else 2**n
        shape = () if n <= COUNTER_BITS else x.shape
        return torch.randint(0, high, shape, generator=generator, dtype=torch.int64, device=x.device)
    if random_bits.shape != x.shape or random_bits.is_floating_point() or random_bits.dtype == torch.bool:
        raise ValueError(f"quantize: random_bits must be an integer tensor of x's shape {tuple(x.shape)}, "
                         f"got {random_bits.dtype} of shape {tuple(random_bits.shape)}")
    return random_bits.to(device=x.device, dtype=torch.int64)
