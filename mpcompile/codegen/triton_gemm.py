"""Emulated GEMM as one Triton kernel: role quantization in the prologue, a rounded accumulator,
output quantization in the epilogue.

``triton_matmul(a, b, arith, ...)`` computes the batched ``a @ b`` of ``emulate.emulated_matmul``
for float32 operands: each program owns a (BM, BN) tile of the output, quantizes the tiles of
``a`` and ``b`` it loads to their role formats (``round_to_format``; stochastic rounding from
the operand's flat index and seed, as ``quantize_role`` draws it), and accumulates:

- ``sequential``: an explicit k loop on CUDA cores, ``acc = round(acc + a[:, k] * b[k, :])``,
  the order of the reference.
- ``chunk(k)``, k >= 16, unrounded products: ``tl.dot`` of a k-wide slab, then one rounded add
  into acc. The slab's operands go in as fp16 where every value of both roles is an fp16 value
  (FP8 roles: tensor cores, whose products are exact, with fp32 sums), else as fp32 (``ieee``
  precision). The slab's sum runs in the hardware's order: it equals the reference's (exact,
  float64) chunk sum wherever that sum is exact in float32, and otherwise may differ in the
  last bits of float32 before the rounding into the accumulator format.
- ``chunk(k)`` otherwise (a ``mul`` format, products formed in float64, or k < 16): each
  chunk's products summed in float64 in k's order, as the reference's.

Products are exact: in float32 where the roles' significands fit 24 bits together and their
range (by the formats, else by the data) keeps every product inside float32's; else in
float64. A ``mul`` format rounds each product (``round_to_format``, or ``round_float64``).

Every rounded add is exact-then-rounded-once. In float32 (deterministic accumulators with at
most 21 fraction bits, float32 terms): ``two_sum`` gives s + e = acc + term exactly,
round-to-odd folds e into s's last bit, and rounding that to the format equals rounding the
exact sum (two guard bits), as ``exact.round_exact`` does. Otherwise (stochastic rounding, 22
or 23 fraction bits, float64 terms) the same steps run in float64, the reference's own. A
float32 accumulator rounding float32 terms to nearest even is float32's own add. Kahan
compensation is four such adds. Stochastic roundings draw ``counter_words(i, stream_seed(seed,
stream, step))`` for output element i, as the reference. Neither fp contraction (an FMA would
break two_sum) nor a narrowing float cast is used.

Not emulated here (``SupportError``): ``pairwise`` order, accumulator formats whose values are
not all float32 values, ``mul`` formats beyond float32's range where products are formed in
float64, and role formats the prologue does not round (scaled or block formats: the ops round
those in memory first; any values are then fine). Registered as the ``triton`` GEMM backend of
the ops (``gemm_backends.register_gemm_backend``; ``mpcompile.backends.load_plugins`` imports
this module the first time the ``triton`` backend is resolved), which falls back to the
reference, with one warning per arithmetic, where this kernel does not emulate it or fails to
compile.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..backends import run_or_fall_back
from ..formats import BlockFormat, FixedFormat, FloatFormat
from ..ops import ArithSpec, QuantSpec
from ..ops.gemm_backends import GemmBackend, GemmFusion, register_gemm_backend
from ..ops.spec import STREAM_ADD, STREAM_BIAS, STREAM_KAHAN, STREAM_MUL
from ..random_bits import COUNTER_BITS
from ..rounding import default_sr_bits, plan_quantize
from .round_spec import RoundSpec, round_spec
from .triton_round import counter_word, round_float64, round_to_format, stream_seed

__all__ = ["SupportError", "triton_matmul", "supports", "rounds"]


class SupportError(ValueError):
    """An arithmetic or role this kernel does not emulate; the reference does."""


class _Role(NamedTuple):
    spec: RoundSpec | None  # None: the operand is used as it is
    stochastic: bool


class _Sum(NamedTuple):
    """How the kernel rounds products and sums: the constexpr arguments of an arithmetic."""

    dot: bool  # chunks of unrounded float32 products are summed by tl.dot (else: an explicit k loop)
    acc: RoundSpec | None  # None: float32's own nearest-even add
    wide: bool  # adds go through float64, as the reference's (stochastic, 22-23 fraction bits, float64 terms)
    acc_sr: bool
    mul: RoundSpec | None
    mul_sr: bool
    kahan: bool


_MUL, _ADD, _BIAS = tl.constexpr(STREAM_MUL), tl.constexpr(STREAM_ADD), tl.constexpr(STREAM_BIAS)
_KAHAN0, _KAHAN1, _KAHAN2, _KAHAN3 = (tl.constexpr(s) for s in STREAM_KAHAN)


@triton.jit
def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@triton.jit
def _round_to_odd(s, e):
    """s + e (|e| <= ulp(s) / 2, from two_sum; float32 or float64) rounded to odd: s if exact,
    odd or not finite, else its neighbour toward e."""
    if s.dtype == tl.float64:
        us = s.to(tl.int64, bitcast=True)
    else:
        us = s.to(tl.int32, bitcast=True)
    toward = tl.where((e > 0) == (s > 0), us + 1, us - 1)  # magnitude up if e has s's sign
    keep = (e == 0) | ((us & 1) == 1) | (tl.abs(s) == float("inf")) | (s != s)
    return tl.where(keep, us, toward).to(s.dtype, bitcast=True)


@triton.jit
def _round_role(x, index, seed, SPEC: tl.constexpr, STOCHASTIC: tl.constexpr):
    """x rounded to a role's format (None: as it is); stochastic bits from the role tensor's flat index."""
    if SPEC is not None:
        rbits = counter_word(index, seed.to(tl.uint32)) if STOCHASTIC else 0
        x = round_to_format(x, rbits, None, SPEC)
    return x


@triton.jit
def _load_role(ptr, offs, mask, index, seed, SPEC: tl.constexpr, STOCHASTIC: tl.constexpr):
    x = _round_role(tl.load(ptr + offs, mask=mask, other=0.0), index, seed, SPEC, STOCHASTIC)
    if SPEC is not None:
        if not SPEC.has_zero:  # E8M0 rounds 0 up to its least value: past the edge must stay 0
            x = tl.where(mask, x, 0.0)
    return x


@triton.jit
def _bits(index, seed, STREAM: tl.constexpr, step, SR: tl.constexpr):
    """The random words of rounding ``step`` of ``STREAM`` (``emulate``'s streams) for the output
    elements numbered ``index``; 0 where that rounding is not stochastic."""
    words = 0
    if SR:
        words = counter_word(index, stream_seed(seed, STREAM, step))
    return words


@triton.jit
def _add_rounded(acc, term, rbits, ACC: tl.constexpr, WIDE: tl.constexpr):
    """acc + term rounded once into the accumulator format, from the exact sum."""
    if ACC is None:  # a float32 accumulator: the add itself rounds to nearest even
        r = acc + term
    elif WIDE:  # as the reference: float64 two_sum, round to odd, round (any mode, 23 fraction bits)
        s, e = _two_sum(acc.to(tl.float64), term.to(tl.float64))
        r = round_float64(_round_to_odd(s, e), rbits, ACC)
    else:
        s, e = _two_sum(acc, term)
        r = round_to_format(_round_to_odd(s, e), 0, None, ACC)
    return r


@triton.jit
def _accumulate(acc, comp, term, index, seed, step, ACC: tl.constexpr, WIDE: tl.constexpr, SR: tl.constexpr,
                KAHAN: tl.constexpr):
    """One (Kahan-compensated) rounded add of term into acc: (acc, comp), as ``emulate._accumulate``."""
    if KAHAN:
        y = _add_rounded(term, -comp, _bits(index, seed, _KAHAN0, step, SR), ACC, WIDE)
        t = _add_rounded(acc, y, _bits(index, seed, _KAHAN1, step, SR), ACC, WIDE)
        z = _add_rounded(t, -acc, _bits(index, seed, _KAHAN2, step, SR), ACC, WIDE)
        comp = _add_rounded(z, -y, _bits(index, seed, _KAHAN3, step, SR), ACC, WIDE)
        acc = t
    else:
        acc = _add_rounded(acc, term, _bits(index, seed, _ADD, step, SR), ACC, WIDE)
    return acc, comp


@triton.jit
def _product(a, b, index, seed, k, MUL: tl.constexpr, MUL_SR: tl.constexpr, P64: tl.constexpr):
    """a * b, exact (in float64 if ``P64``, else in float32), rounded to the mul format if there
    is one (to a float32 value)."""
    if P64:
        p = a.to(tl.float64) * b.to(tl.float64)
        if MUL is not None:
            p = round_float64(p, _bits(index, seed, _MUL, k, MUL_SR), MUL)
    else:
        p = a * b
        if MUL is not None:
            p = round_to_format(p, _bits(index, seed, _MUL, k, MUL_SR), None, MUL)
    return p


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, index_ptr, sbias, M, N, K,
                 sab, sam, sak, sbb, sbk, sbn,
                 ia_b, ia_m, ia_k, ib_b, ib_k, ib_n, seed_a, seed_b, seed_out, seed_sum,
                 A_SPEC: tl.constexpr, A_SR: tl.constexpr, B_SPEC: tl.constexpr, B_SR: tl.constexpr,
                 ACC: tl.constexpr, WIDE: tl.constexpr, ACC_SR: tl.constexpr, KAHAN: tl.constexpr,
                 MUL: tl.constexpr, MUL_SR: tl.constexpr, P64: tl.constexpr, HAS_INDEX: tl.constexpr,
                 CHUNK: tl.constexpr, DOT: tl.constexpr, DOT16: tl.constexpr, HAS_BIAS: tl.constexpr,
                 OUT_SPEC: tl.constexpr, OUT_SR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_b, pid_m, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm, mn = rm < M, rn < N
    im, in_, ib = rm.to(tl.int64), rn.to(tl.int64), pid_b.to(tl.int64)  # flat indices may pass 2**31
    a_base = a_ptr + pid_b * sab
    b_base = b_ptr + pid_b * sbb
    offs = ib * M * N + im[:, None] * N + in_[None, :]
    omask = mm[:, None] & mn[None, :]
    index = tl.load(index_ptr + offs, mask=omask, other=0) if HAS_INDEX else offs  # numbers the sums' random bits
    seed = seed_sum.to(tl.uint32)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    comp = tl.zeros((BM, BN), dtype=tl.float32)
    if CHUNK == 0:
        for k in range(0, K):
            a = _load_role(a_base, rm * sam + k * sak, mm, ib * ia_b + im * ia_m + k * ia_k, seed_a, A_SPEC, A_SR)
            b = _load_role(b_base, k * sbk + rn * sbn, mn, ib * ib_b + k * ib_k + in_ * ib_n, seed_b, B_SPEC, B_SR)
            p = _product(a[:, None], b[None, :], index, seed, k, MUL, MUL_SR, P64)
            acc, comp = _accumulate(acc, comp, p, index, seed, k, ACC, WIDE, ACC_SR, KAHAN)
    elif not DOT:  # rounded or float64 products: each chunk summed in float64 in k's order, as the reference
        for k0 in range(0, K, CHUNK):
            partial = tl.zeros((BM, BN), dtype=tl.float64)
            for k in range(k0, tl.minimum(k0 + CHUNK, K)):
                a = _load_role(a_base, rm * sam + k * sak, mm, ib * ia_b + im * ia_m + k * ia_k, seed_a, A_SPEC, A_SR)
                b = _load_role(b_base, k * sbk + rn * sbn, mn, ib * ib_b + k * ib_k + in_ * ib_n, seed_b, B_SPEC,
                               B_SR)
                p = _product(a[:, None], b[None, :], index, seed, k, MUL, MUL_SR, P64).to(tl.float64)
                partial = tl.where(k == k0, p, partial + p)  # from the first product: -0 stays -0
            acc, comp = _accumulate(acc, comp, partial, index, seed, k0 // CHUNK, ACC, WIDE, ACC_SR, KAHAN)
    else:
        rk = tl.arange(0, CHUNK)
        for k0 in range(0, K, CHUNK):
            ks = k0 + rk
            mk = ks < K
            a = _load_role(a_base, rm[:, None] * sam + ks[None, :] * sak, mm[:, None] & mk[None, :],
                           ib * ia_b + im[:, None] * ia_m + ks[None, :] * ia_k, seed_a, A_SPEC, A_SR)
            b = _load_role(b_base, ks[:, None] * sbk + rn[None, :] * sbn, mk[:, None] & mn[None, :],
                           ib * ib_b + ks[:, None] * ib_k + in_[None, :] * ib_n, seed_b, B_SPEC, B_SR)
            if DOT16:  # every operand value is an fp16 value: tensor cores, exact products, fp32 sums
                d = tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
            else:
                d = tl.dot(a, b, input_precision="ieee")
            acc, comp = _accumulate(acc, comp, d, index, seed, k0 // CHUNK, ACC, WIDE, ACC_SR, KAHAN)
    if HAS_BIAS:  # one more rounded add, as the reference adds a bias (not compensated)
        bias = tl.load(bias_ptr + pid_b * sbias + rn, mask=mn, other=0.0)[None, :]
        acc = _add_rounded(acc, bias, _bits(index, seed, _BIAS, 0, ACC_SR), ACC, WIDE)
    acc = _round_role(acc, offs, seed_out, OUT_SPEC, OUT_SR)  # the output role, from registers
    tl.store(c_ptr + offs, acc, mask=omask)


def _fits_fp16(spec: QuantSpec | None) -> bool:
    """Whether every value rounded as ``spec`` is an fp16 value (FP8 formats, for instance)."""
    fmt = None if spec is None else spec.fmt
    # values are multiples of min_subnormal (a power of two) with at most man + 1 significant bits
    return (spec is not None and spec.scaling == "none" and isinstance(fmt, FloatFormat) and fmt.man <= 10
            and fmt.max <= 65504 and fmt.min_subnormal >= 2.0**-24)


def _significand_bits(spec: QuantSpec | None) -> int:
    """At most how many significant bits a value rounded as ``spec`` has (24: any float32).
    Power-of-two scales (block, tensor, channel) keep the element's; ``*_amax`` scales do not."""
    if spec is None or spec.scaling.endswith("_amax"):
        return 24
    fmt = spec.fmt.element if isinstance(spec.fmt, BlockFormat) else spec.fmt
    if isinstance(fmt, FloatFormat):
        return fmt.man + 1
    return fmt.bits if isinstance(fmt, FixedFormat) else 24


def rounds(spec: QuantSpec) -> bool:
    """Whether the kernel rounds to role ``spec`` in registers: an unscaled element format."""
    return spec.scaling == "none" and isinstance(spec.fmt, (FloatFormat, FixedFormat))


@functools.lru_cache(maxsize=512)
def _role_spec(spec: QuantSpec | None, device_type: str) -> _Role:
    if spec is None:
        return _Role(None, False)
    if not rounds(spec):
        raise SupportError(f"role {spec}: only unscaled element formats are quantized in the GEMM prologue")
    sr = spec.rounding == "stochastic"
    n = min(default_sr_bits(spec.fmt, torch.float32), COUNTER_BITS)  # as quantize_role draws them
    plan, params = plan_quantize(spec.fmt, spec.rounding, spec.saturate, torch.float32, n, sr,
                                 torch.device(device_type))
    return _Role(round_spec(plan, params), sr)


_BINARY32 = FloatFormat(8, 23)


@functools.lru_cache(maxsize=256)
def _sum_spec(arith: ArithSpec, device_type: str, p64: bool) -> _Sum:
    """The kernel's rounding of ``arith``'s products and sums (``p64``: the products are formed
    in float64). A chunk of unrounded float32 products, k >= 16, is one tl.dot; rounded or
    float64 products, and chunks under 16, are summed in float64 in k's order."""
    if arith.order == "pairwise":
        raise SupportError(f"arithmetic {arith}: order pairwise is not emulated by the Triton GEMM")
    acc, device = arith.acc, torch.device(device_type)
    if not _in_float32(acc):
        raise SupportError(f"arithmetic {arith}: the accumulator's values are not all float32 values")
    mul = None
    if arith.mul is not None:
        if p64 and not _in_float32(arith.mul):
            raise SupportError(f"arithmetic {arith}: products rounded in float64 must be float32 values")
        n = arith.sr_bits_for(arith.mul)
        mul = round_spec(*plan_quantize(arith.mul, arith.mul_rounding, False, torch.float32, n, False, device))
    dot = (arith.chunk or 0) >= 16 and mul is None and not p64
    wide = p64 or (arith.chunk is not None and not dot) or arith.rounding == "stochastic"  # float64 terms, or SR
    if acc == _BINARY32 and arith.rounding == "nearest" and not wide:
        spec = None
    else:
        wide = wide or acc.man > 21  # round-to-odd in float32 keeps two guard bits below 21 only
        n = arith.sr_bits_for(acc)
        spec = round_spec(*plan_quantize(acc, arith.rounding, False, torch.float32, n, False, device))
    return _Sum(dot, spec, wide, arith.rounding == "stochastic", mul,
                mul is not None and arith.mul_rounding == "stochastic", arith.kahan)


def _in_float32(fmt: FloatFormat) -> bool:
    return fmt.emax <= 127 and fmt.min_subnormal >= 2.0**-149 and fmt.man <= 23


def _magnitudes(spec: QuantSpec | None) -> tuple[float, float] | None:
    """(least nonzero, greatest) magnitude of a value rounded as ``spec``; None: not bounded by
    the format (no role, or scaled)."""
    if spec is None or spec.scaling != "none" or isinstance(spec.fmt, BlockFormat):
        return None
    return spec.fmt.min_subnormal, max(spec.fmt.max, -getattr(spec.fmt, "min", 0.0))


def _data_bounds(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """float64 [least quantum of a nonzero value, greatest magnitude] of x once rounded as
    ``spec`` (or as it is): rounding keeps a nonzero magnitude at or above the power of two
    below it (a format without zero lifts zeros to its least value) and at most doubles it."""
    t = x.detach().abs()
    least = torch.where(t == 0, torch.inf, t).amin().double()
    if spec is not None and not getattr(spec.fmt, "has_zero", True):
        least = torch.clamp_max(least, spec.fmt.min_subnormal)
    quantum = torch.exp2(torch.floor(torch.log2(least)) - (_significand_bits(spec) - 1))
    return torch.stack([quantum, 2 * t.amax().double()])


def _products_in_float32(a: torch.Tensor | None, b: torch.Tensor | None, a_role: QuantSpec | None,
                         b_role: QuantSpec | None) -> bool:
    """Whether every product of a and b, rounded to their roles, is exact in float32: their
    significands fit 24 bits together, and their range float32's, by the formats or else by
    the data (one synchronisation; None: no data, the formats must tell)."""
    if _significand_bits(a_role) + _significand_bits(b_role) > 24:
        return False
    ra, rb = _magnitudes(a_role), _magnitudes(b_role)
    if ra is not None and rb is not None and ra[0] * rb[0] >= 2.0**-149 and ra[1] * rb[1] < 2.0**128:
        return True
    if a is None or b is None:
        return False
    if a.numel() == 0 or b.numel() == 0:
        return True
    qa, ha, qb, hb = torch.cat([_data_bounds(a, a_role), _data_bounds(b, b_role)]).tolist()
    return qa * qb >= 2.0**-149 and ha * hb < 2.0**128  # NaN and inf say no


def supports(arith: ArithSpec, a_role: QuantSpec | None = None, b_role: QuantSpec | None = None, *,
             quantize: bool | tuple[bool, bool] = True) -> bool:
    """Whether ``triton_matmul`` emulates this arithmetic with these operand roles (``quantize``:
    rounding them, or the one of (a, b) it names, in its prologue, else taking them rounded)."""
    p64 = not _products_in_float32(None, None, a_role, b_role)  # by the formats alone
    try:
        _check(arith, a_role, b_role, "cpu", quantize, p64)
    except SupportError:
        return False
    return True


def _check(arith, a_role, b_role, device_type, quantize: bool | tuple[bool, bool], p64: bool
           ) -> tuple[_Role, _Role, _Sum]:
    qa, qb = (quantize, quantize) if isinstance(quantize, bool) else quantize
    a = _role_spec(a_role, device_type) if qa else _Role(None, False)
    b = _role_spec(b_role, device_type) if qb else _Role(None, False)
    return a, b, _sum_spec(arith, device_type, p64)


def _index_strides(shape: tuple[int, int, int], transposed: bool) -> tuple[int, int, int]:
    """Flat-index strides (batch, row, col) of an operand as its role tensor lays it out: a
    (B, K, N) right operand read from an (N, K) weight has index n * K + k."""
    batch, rows, cols = shape
    if transposed:
        return rows * cols, 1, rows
    return rows * cols, cols, 1


def _tiles(sums: _Sum, device_type: str) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) of a launch. The interpreter pays per program, so it gets
    large tiles whatever the loop. On a GPU, dots whose chunk adds are float32's get 128x128
    tiles (64 outputs per thread); float64 adds, Kahan and explicit k loops hold more registers
    per output, and 128x128 tiles (or 64x64 on 4 warps) spill them (ptxas, sm_90), so 64x64 on
    8 warps."""
    if device_type == "cpu":
        return 64, 64, 4, 1
    return (128, 128, 8, 3) if sums.dot and not (sums.wide or sums.kahan) else (64, 64, 8, 2)


def triton_matmul(a: torch.Tensor, b: torch.Tensor, arith: ArithSpec, *, a_role: QuantSpec | None = None,
                  b_role: QuantSpec | None = None, seed_a: int = 0, seed_b: int = 0,
                  a_transposed: bool = False, b_transposed: bool = False,
                  quantize: bool | tuple[bool, bool] = True,
                  bias: torch.Tensor | None = None,
                  out_role: QuantSpec | None = None, seed_out: int = 0,
                  seed: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
    """Batched ``a @ b`` with ``a`` and ``b`` quantized to their roles and ``arith``'s accumulation.

    Args:
        a: float32 (B, M, K).
        b: float32 (B, K, N) (a view, e.g. a weight's transpose, is fine).
        arith: the forward arithmetic (``sequential`` or ``chunk(k)`` order).
        a_role, b_role: the operands' role formats (None: used as they are).
        seed_a, seed_b: seeds of the operands' stochastic rounding (``counter_bits`` of their
            flat index, as ``quantize_role``).
        a_transposed: a's role tensor is (B, K, M) (grad_output for a weight's gradient): its
            flat index is k * M + m.
        b_transposed: b's role tensor is (B, N, K) (a linear weight): its flat index is n * K + k.
        quantize: round the operands to their roles in the prologue (a pair: each operand's
            choice); False: they already are (the roles then only vouch that the products are
            exact).
        bias: float32 (N,) or (B, N), already rounded to its role: added in the epilogue with
            one more rounding into the accumulator, as the reference adds a bias.
        out_role, seed_out: the output's role, applied in the epilogue to the float32 result
            (stochastic bits from the output's flat index and ``seed_out``).
        seed, index: for stochastic rounding of products or sums, as ``emulated_matmul`` takes
            them: the reduction's seed, and int64 (B, M, N) numbers of the output elements
            (default row-major); a bias's add draws its bits as ``ops.bodies.add_bias``, from
            ``index``.

    Returns:
        float32 (B, M, N) holding values of ``arith.acc``.

    Raises:
        SupportError: an arithmetic or role this kernel does not emulate.
    """
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise SupportError("triton_matmul computes on float32 operands")
    p64 = not _products_in_float32(a, b, a_role, b_role)
    ra, rb, sums = _check(arith, a_role, b_role, a.device.type, quantize, p64)
    if arith.stochastic and seed is None:
        raise ValueError("triton_matmul: stochastic rounding of products or sums needs a seed")
    out = _role_spec(out_role, a.device.type)
    B, M, K = a.shape
    N = b.shape[-1]
    c = torch.empty(B, M, N, dtype=torch.float32, device=a.device)
    chunk = arith.chunk or 0
    has_index = arith.stochastic and index is not None
    if has_index and tuple(index.shape) != (B, M, N):
        raise ValueError(f"triton_matmul: index must have the output's shape {(B, M, N)}, got {tuple(index.shape)}")
    bm, bn, warps, stages = _tiles(sums, a.device.type)
    grid = (B, triton.cdiv(M, bm), triton.cdiv(N, bn))
    ia = _index_strides((B, M, K), a_transposed)
    ib = _index_strides((B, K, N), b_transposed)
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) not in ((N,), (B, N))):
        raise SupportError(f"bias must be float32 of shape ({N},) or ({B}, {N}), got {bias.dtype} "
                           f"{tuple(bias.shape)}")
    bias_ptr, sbias = (c, 0) if bias is None else (bias.contiguous(), N if bias.dim() == 2 else 0)
    index_ptr = index.to(torch.int64).contiguous() if has_index else c
    _gemm_kernel[grid](a, b, c, bias_ptr, index_ptr, sbias, M, N, K, a.stride(0), a.stride(1),
                       a.stride(2), b.stride(0), b.stride(1), b.stride(2), *ia, *ib, seed_a, seed_b, seed_out,
                       seed or 0, A_SPEC=ra.spec, A_SR=ra.stochastic, B_SPEC=rb.spec, B_SR=rb.stochastic,
                       ACC=sums.acc, WIDE=sums.wide, ACC_SR=sums.acc_sr, KAHAN=sums.kahan, MUL=sums.mul,
                       MUL_SR=sums.mul_sr, P64=p64, HAS_INDEX=has_index, CHUNK=chunk, DOT=sums.dot,
                       DOT16=sums.dot and _fits_fp16(a_role) and _fits_fp16(b_role), HAS_BIAS=bias is not None,
                       OUT_SPEC=out.spec, OUT_SR=out.stochastic, BM=bm, BN=bn, num_warps=warps, num_stages=stages,
                       enable_fp_fusion=False)  # an FMA in two_sum or in acc + a * b would change the sums
    return c


_NOTED: set[tuple] = set()  # (arith, roles) the kernel does not emulate or failed on: the reference runs
_UNFUSED: set[tuple] = set()  # (arith, roles, fusion flags, output role) it emulates only unfused


def _note_once(key: tuple, text: str) -> None:
    if key not in _NOTED:
        _NOTED.add(key)
        warnings.warn(f"mpcompile: {text}; the torch reference computes it (same numbers)", RuntimeWarning,
                      stacklevel=4)


def _gemm_backend(a: torch.Tensor, b: torch.Tensor, arith: ArithSpec, a_role: QuantSpec | None,
                  b_role: QuantSpec | None, fusion: GemmFusion | None = None, seed: int | None = None,
                  index: torch.Tensor | None = None) -> torch.Tensor | None:
    """The ops' ``triton`` GEMM (``gemm_backends.GemmBackend``); None where it does not emulate
    the call. A fusion whose rounding the kernel cannot do returns None quietly (the op then
    rounds in memory and calls again without it); an arithmetic it does not emulate warns once."""
    if a.dtype != torch.float32 or b.dtype != torch.float32 or (arith.stochastic and seed is None):
        return None  # float64 work (sums against ones, exact products) stays with the reference, as do its errors
    key = (arith, a_role, b_role)
    fused = None if fusion is None else (*key, fusion.round_a, fusion.round_b, fusion.out_role)
    if fused in _UNFUSED:
        return None

    def kernel() -> torch.Tensor | None:
        try:
            if fusion is None:
                return triton_matmul(a, b, arith, a_role=a_role, b_role=b_role, quantize=False, seed=seed, index=index)
            f = fusion
            return triton_matmul(a, b, arith, a_role=a_role, b_role=b_role, seed_a=f.seed_a, seed_b=f.seed_b,
                                 a_transposed=f.a_transposed, b_transposed=f.b_transposed,
                                 quantize=(f.round_a, f.round_b), bias=f.bias, out_role=f.out_role,
                                 seed_out=f.seed_out, seed=seed, index=index)
        except SupportError as err:  # not emulated: said once, not a failure
            if fusion is None:
                _note_once(key, f"Triton GEMM: {err}")
            else:
                _UNFUSED.add(fused)
            return None

    return run_or_fall_back(_NOTED, key, kernel, lambda: None, f"the Triton GEMM for {arith} with roles "
                                                                 f"{a_role} x {b_role}", stacklevel=5)


register_gemm_backend("triton", GemmBackend(gemm=_gemm_backend, rounds=rounds))
