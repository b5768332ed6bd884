"""Emulated GEMM as one Triton kernel: role quantization in the prologue, a rounded accumulator,
output quantization in the epilogue.

``triton_matmul(a, b, arith, ...)`` computes the batched ``a @ b`` of ``emulate.emulated_matmul``
for float32 operands: each program owns a (BM, BN) tile of the output, quantizes the tiles of
``a`` and ``b`` it loads to their role formats (``round_to_format``; stochastic rounding from
the operand's flat index and seed, as ``quantize_role`` draws it), and accumulates:

- ``sequential``: an explicit k loop on CUDA cores, ``acc = round(acc + a[:, k] * b[k, :])``,
  the order of the reference. The product of two quantized values is exact in float32 when their
  significands fit 24 bits together (checked before launch).
- ``chunk(k)``: ``tl.dot`` of a k-wide slab, then one rounded add into acc. The slab's operands
  go in as fp16 where every value of both roles is an fp16 value (FP8 roles: tensor cores, whose
  products are exact, with fp32 sums), else as fp32 (``ieee`` precision). The slab's sum runs in
  the hardware's order: it equals the reference's (exact, float64) chunk sum wherever that sum
  is exact in float32, and otherwise may differ in the last bits of float32 before the rounding
  into the accumulator format.

Every rounded add is exact-then-rounded-once: ``two_sum`` gives s + e = acc + term exactly,
round-to-odd folds e into s's last bit, and rounding that to a format with at most 21 fraction
bits equals rounding the exact sum (two guard bits), as ``exact.round_exact`` does. A float32
accumulator rounding to nearest even is float32's own add. Neither fp contraction (an FMA would
break two_sum) nor a float cast is used.

Supported here, else ``SupportError``: deterministic accumulator rounding, no ``mul`` format, no
Kahan, accumulator formats inside float32's range with at most 21 fraction bits (or float32 with
nearest-even rounding), operands whose products are exact in float32 (both rounded to formats
whose significands fit 24 bits together), role formats that are unscaled element formats (float
or fixed point) where the kernel rounds them (operands rounded beforehand may have any
power-of-two scaling, block formats included). Registered as the ``triton`` GEMM backend of the
ops (``gemm_backends.register_gemm_backend``), which falls back to the reference, with one
warning per arithmetic, where this kernel does not emulate it or fails to compile.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..formats import BlockFormat, FixedFormat, FloatFormat
from ..ops.gemm_backends import GemmBackend, GemmFusion, register_gemm_backend
from ..ops.spec import ArithSpec, QuantSpec
from ..random_bits import COUNTER_BITS
from ..rounding import default_sr_bits, plan_quantize
from .triton_round import RoundSpec, counter_word, round_spec, round_to_format

__all__ = ["SupportError", "triton_matmul", "supports", "rounds"]


class SupportError(ValueError):
    """An arithmetic or role this kernel does not emulate; the reference does."""


class _Role(NamedTuple):
    spec: RoundSpec | None  # None: the operand is used as it is
    stochastic: bool


@triton.jit
def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@triton.jit
def _round_to_odd(s, e):
    """s + e (|e| <= ulp(s) / 2, from two_sum) rounded to odd: s if exact or odd, else its
    neighbour toward e."""
    us = s.to(tl.int32, bitcast=True)
    toward = tl.where((e > 0) == (s > 0), us + 1, us - 1)  # magnitude up if e has s's sign
    return tl.where((e == 0) | ((us & 1) == 1), us, toward).to(tl.float32, bitcast=True)


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
def _add_rounded(acc, term, ACC: tl.constexpr):
    if ACC is None:  # a float32 accumulator: the add itself rounds to nearest even
        return acc + term
    s, e = _two_sum(acc, term)
    return round_to_format(_round_to_odd(s, e), 0, None, ACC)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, sbias, M, N, K,
                 sab, sam, sak, sbb, sbk, sbn,
                 ia_b, ia_m, ia_k, ib_b, ib_k, ib_n, seed_a, seed_b, seed_out,
                 A_SPEC: tl.constexpr, A_SR: tl.constexpr, B_SPEC: tl.constexpr, B_SR: tl.constexpr,
                 ACC: tl.constexpr, CHUNK: tl.constexpr, DOT16: tl.constexpr, HAS_BIAS: tl.constexpr,
                 OUT_SPEC: tl.constexpr, OUT_SR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_b, pid_m, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm, mn = rm < M, rn < N
    im, in_, ib = rm.to(tl.int64), rn.to(tl.int64), pid_b.to(tl.int64)  # flat indices may pass 2**31
    a_base = a_ptr + pid_b * sab
    b_base = b_ptr + pid_b * sbb
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if CHUNK == 0:
        for k in range(0, K):
            a = _load_role(a_base, rm * sam + k * sak, mm, ib * ia_b + im * ia_m + k * ia_k, seed_a, A_SPEC, A_SR)
            b = _load_role(b_base, k * sbk + rn * sbn, mn, ib * ib_b + k * ib_k + in_ * ib_n, seed_b, B_SPEC, B_SR)
            acc = _add_rounded(acc, a[:, None] * b[None, :], ACC)
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
            acc = _add_rounded(acc, d, ACC)
    offs = ib * M * N + im[:, None] * N + in_[None, :]
    if HAS_BIAS:  # one more rounded add, as the reference adds a bias
        acc = _add_rounded(acc, tl.load(bias_ptr + pid_b * sbias + rn, mask=mn, other=0.0)[None, :], ACC)
    acc = _round_role(acc, offs, seed_out, OUT_SPEC, OUT_SR)  # the output role, from registers
    tl.store(c_ptr + offs, acc, mask=mm[:, None] & mn[None, :])


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
def _acc_spec(arith: ArithSpec, device_type: str) -> RoundSpec | None:
    """The accumulator's rounding; None where it is float32's own round-to-nearest-even add."""
    if arith.mul is not None or arith.kahan or arith.stochastic:
        raise SupportError(f"arithmetic {arith}: the Triton GEMM emulates exact products, no Kahan, and "
                           f"deterministic accumulator rounding")
    if arith.order not in ("sequential",) and arith.chunk is None:
        raise SupportError(f"arithmetic {arith}: order {arith.order} is not emulated by the Triton GEMM")
    if arith.acc == _BINARY32 and arith.rounding == "nearest":
        return None
    if arith.acc.man > 21:
        raise SupportError(f"arithmetic {arith}: round-to-odd needs two guard bits below the accumulator's "
                           f"{arith.acc.man} fraction bits in float32's 23")
    if arith.acc.emax > 127 or arith.acc.min_subnormal < 2.0**-149:
        raise SupportError(f"arithmetic {arith}: the accumulator's range exceeds float32's")
    plan, params = plan_quantize(arith.acc, arith.rounding, False, torch.float32, 1, False,
                                 torch.device(device_type))
    return round_spec(plan, params)


def supports(arith: ArithSpec, a_role: QuantSpec | None = None, b_role: QuantSpec | None = None, *,
             quantize: bool | tuple[bool, bool] = True) -> bool:
    """Whether ``triton_matmul`` emulates this arithmetic with these operand roles (``quantize``:
    rounding them, or the one of (a, b) it names, in its prologue, else taking them rounded)."""
    try:
        _check(arith, a_role, b_role, "cpu", quantize)
    except SupportError:
        return False
    return True


def _check(arith, a_role, b_role, device_type, quantize: bool | tuple[bool, bool] = True
           ) -> tuple[_Role, _Role, RoundSpec | None]:
    qa, qb = (quantize, quantize) if isinstance(quantize, bool) else quantize
    a = _role_spec(a_role, device_type) if qa else _Role(None, False)
    b = _role_spec(b_role, device_type) if qb else _Role(None, False)
    if _significand_bits(a_role) + _significand_bits(b_role) > 24:
        raise SupportError(f"roles {a_role} x {b_role}: their products are not exact in float32")
    return a, b, _acc_spec(arith, device_type)


def _index_strides(shape: tuple[int, int, int], transposed: bool) -> tuple[int, int, int]:
    """Flat-index strides (batch, row, col) of an operand as its role tensor lays it out: a
    (B, K, N) right operand read from an (N, K) weight has index n * K + k."""
    batch, rows, cols = shape
    if transposed:
        return rows * cols, 1, rows
    return rows * cols, cols, 1


def _tiles(chunk: int, device_type: str) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) of a launch: the interpreter pays per program, so it gets
    large tiles whatever the order."""
    if device_type == "cpu":
        return 64, 64, 4, 1
    return (128, 128, 8, 3) if chunk else (64, 64, 4, 2)


def triton_matmul(a: torch.Tensor, b: torch.Tensor, arith: ArithSpec, *, a_role: QuantSpec | None = None,
                  b_role: QuantSpec | None = None, seed_a: int = 0, seed_b: int = 0,
                  a_transposed: bool = False, b_transposed: bool = False,
                  quantize: bool | tuple[bool, bool] = True,
                  bias: torch.Tensor | None = None,
                  out_role: QuantSpec | None = None, seed_out: int = 0) -> torch.Tensor:
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

    Returns:
        float32 (B, M, N) holding values of ``arith.acc``.

    Raises:
        SupportError: an arithmetic or role this kernel does not emulate.
    """
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise SupportError("triton_matmul computes on float32 operands")
    ra, rb, acc = _check(arith, a_role, b_role, a.device.type, quantize)
    out = _role_spec(out_role, a.device.type)
    B, M, K = a.shape
    N = b.shape[-1]
    c = torch.empty(B, M, N, dtype=torch.float32, device=a.device)
    chunk = arith.chunk or 0
    if chunk and chunk < 16:
        raise SupportError(f"arithmetic {arith}: tl.dot needs chunks of at least 16")
    bm, bn, warps, stages = _tiles(chunk, a.device.type)
    grid = (B, triton.cdiv(M, bm), triton.cdiv(N, bn))
    ia = _index_strides((B, M, K), a_transposed)
    ib = _index_strides((B, K, N), b_transposed)
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) not in ((N,), (B, N))):
        raise SupportError(f"bias must be float32 of shape ({N},) or ({B}, {N}), got {bias.dtype} "
                           f"{tuple(bias.shape)}")
    bias_ptr, sbias = (c, 0) if bias is None else (bias.contiguous(), N if bias.dim() == 2 else 0)
    _gemm_kernel[grid](a, b, c, bias_ptr, sbias, M, N, K, a.stride(0), a.stride(1),
                       a.stride(2), b.stride(0), b.stride(1), b.stride(2), *ia, *ib, seed_a, seed_b, seed_out,
                       A_SPEC=ra.spec, A_SR=ra.stochastic, B_SPEC=rb.spec, B_SR=rb.stochastic, ACC=acc,
                       CHUNK=chunk, DOT16=bool(chunk) and _fits_fp16(a_role) and _fits_fp16(b_role),
                       HAS_BIAS=bias is not None, OUT_SPEC=out.spec, OUT_SR=out.stochastic, BM=bm, BN=bn,
                       num_warps=warps, num_stages=stages, enable_fp_fusion=False)  # an FMA in two_sum or in acc + a * b would change the sums
    return c


_NOTED: set[tuple] = set()  # (arith, roles) the kernel does not emulate or failed on: the reference runs
_UNFUSED: set[tuple] = set()  # (arith, roles, fusion flags, output role) it emulates only unfused


def _note_once(key: tuple, text: str) -> None:
    if key not in _NOTED:
        _NOTED.add(key)
        warnings.warn(f"mpcompile: {text}; the torch reference computes it (same numbers)", RuntimeWarning,
                      stacklevel=4)


def _gemm_backend(a: torch.Tensor, b: torch.Tensor, arith: ArithSpec, a_role: QuantSpec | None,
                  b_role: QuantSpec | None, fusion: GemmFusion | None = None) -> torch.Tensor | None:
    """The ops' ``triton`` GEMM (``gemm_backends.GemmBackend``); None where it does not emulate
    the call. A fusion whose rounding the kernel cannot do returns None quietly (the op then
    rounds in memory and calls again without it); an arithmetic it does not emulate warns once."""
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        return None  # float64 work (sums against ones, exact products) stays with the reference
    key = (arith, a_role, b_role)
    fused = None if fusion is None else (*key, fusion.round_a, fusion.round_b, fusion.out_role)
    if key in _NOTED or fused in _UNFUSED:
        return None
    try:
        if fusion is None:
            return triton_matmul(a, b, arith, a_role=a_role, b_role=b_role, quantize=False)
        f = fusion
        return triton_matmul(a, b, arith, a_role=a_role, b_role=b_role, seed_a=f.seed_a, seed_b=f.seed_b,
                             a_transposed=f.a_transposed, b_transposed=f.b_transposed,
                             quantize=(f.round_a, f.round_b), bias=f.bias, out_role=f.out_role, seed_out=f.seed_out)
    except SupportError as err:
        if fusion is None:
            _note_once(key, f"Triton GEMM: {err}")
        else:
            _UNFUSED.add(fused)
    except Exception as err:  # a kernel that fails to compile must not cost the user the result
        _note_once(key, f"the Triton GEMM for {arith} with roles {a_role} x {b_role} failed "
                        f"({type(err).__name__}: {str(err)[:200]})")
    return None


register_gemm_backend("triton", GemmBackend(gemm=_gemm_backend, rounds=rounds))
