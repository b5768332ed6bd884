"""Packed storage: the values of a format as integer codes, so low precision saves real memory.

A format of at most 8 bits packs into uint8 codes, one of at most 16 into int16 (the uint16
bit pattern). A float format's code is its bit pattern (sign, exponent field, trailing
significand), a fixed format's its two's complement integer. A block format packs its elements
so and each block's power-of-two scale as an E8M0 code (exponent + 127; 255 is the NaN of a
block whose values are NaN), one per ``block_size`` elements along its axis. A block-wise
codebook format (``blockwise(dynamic8,256)``) packs a code a byte (two a byte for 4 bits) and
each block's fp32 absmax. ``decode(encode(x))`` is ``x`` bit for bit, for every value of the
format (-0, inf and NaN included); ``encode`` refuses a value the format does not have (round
with ``quantize`` first).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..errors import FormatError
from .block_format import SCALE_EXP_MAX, SCALE_EXP_MIN, BlockFormat
from .codebook_codes import block_values, codes_of_values
from .codebook_format import CodebookFormat
from .fixed_format import FixedFormat
from .float_format import FloatFormat

__all__ = ["Packed", "encode", "decode", "code_values", "torch_dtype"]

_E8M0_BIAS, _E8M0_NAN = 127, 255


@dataclass
class Packed:
    """Codes of one tensor in one format; ``scales`` are the E8M0 block scales (block formats) or
    the fp32 absmax of each block (codebook formats)."""

    codes: torch.Tensor
    scales: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales) if t is not None)


def _code_dtype(bits: int) -> torch.dtype:
    if bits <= 8:
        return torch.uint8
    if bits <= 16:
        return torch.int16
    raise FormatError(f"packed storage holds formats of at most 16 bits, not {bits}")


@functools.lru_cache(maxsize=None)
def code_values(fmt: FloatFormat | FixedFormat) -> torch.Tensor:
    """float64 value of every code 0 .. 2**bits - 1 of an element format (NaN for NaN codes)."""
    _code_dtype(fmt.bits)
    codes = range(2**fmt.bits)
    if isinstance(fmt, FixedFormat):
        ints = [c - 2**fmt.wl if fmt.signed and c >> (fmt.wl - 1) else c for c in codes]
        return torch.tensor(ints, dtype=torch.float64) * 2.0**-fmt.fl
    mag_bits = fmt.exp + fmt.man
    values = []
    for c in codes:
        negative, mag = bool(fmt.signed and c >> mag_bits), c & (2**mag_bits - 1)
        if mag <= fmt._max_code:
            v = fmt._decode(mag)
            v = float("nan") if negative and v == 0 and not fmt.neg_zero else -v if negative else v
        else:
            v = float("inf") if fmt.inf and mag == fmt._max_code + 1 else float("nan")
            v = -v if negative else v
        values.append(v)
    return torch.tensor(values, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _encoding(fmt: FloatFormat | FixedFormat) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Sorted distinct values (-0 apart), the lowest code of each, and a NaN code (or None)."""
    values = code_values(fmt)
    keyed: dict[tuple[float, bool], int] = {}
    for code, v in enumerate(values.tolist()):
        if v == v:  # not NaN
            keyed.setdefault((v, math.copysign(1.0, v) < 0 and v == 0), code)
    order = sorted(keyed, key=lambda k: (k[0], not k[1]))  # -0 sorts before +0
    nan = next((c for c, v in enumerate(values.tolist()) if v != v), None)
    return (torch.tensor([k[0] for k in order], dtype=torch.float64),
            torch.tensor([keyed[k] for k in order], dtype=torch.int64), nan)


@functools.lru_cache(maxsize=None)
def torch_dtype(fmt) -> torch.dtype | None:
    """The torch dtype whose values and bit patterns are ``fmt``'s values and codes (bf16, fp16,
    the OCP fp8s), or None: torch's cast to it is ``fmt``'s round to nearest even."""
    from .registry import get

    same = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e5m2": torch.float8_e5m2,
            "fp8_e4m3": torch.float8_e4m3fn}
    return next((dtype for name, dtype in same.items() if get(name) == fmt), None)


def _encode_elements(x: torch.Tensor, fmt: FloatFormat | FixedFormat) -> torch.Tensor:
    dtype = torch_dtype(fmt)
    if dtype is not None:  # a cast gives the code, one pass instead of a search
        cast = x.detach().to(dtype)
        isnan = torch.isnan(x)
        found = (cast.to(x.dtype) == x) | isnan
        if not bool(found.all()):
            bad = x[~found].flatten()[0].item()
            raise FormatError(f"encode: {bad!r} is not a value of {fmt}; round to it first (mpcompile.rounding.quantize)")
        codes = cast.view(_code_dtype(fmt.bits))
        return torch.where(isnan, _encoding(fmt)[2], codes) if bool(isnan.any()) else codes
    sorted_values, codes, nan = _encoding(fmt)
    x = x.detach().double()
    device = x.device
    sorted_values, codes = sorted_values.to(device), codes.to(device)
    index = torch.searchsorted(sorted_values, x).clamp_(max=len(sorted_values) - 1)
    # -0 and +0 are equal: the search lands on -0 where the format has both; step to +0 for +0
    step = (x == 0) & ~torch.signbit(x) & (sorted_values[index] == 0) & torch.signbit(sorted_values[index])
    index += step.to(index.dtype)
    found = sorted_values[index] == x
    out = codes[index]
    isnan = torch.isnan(x)
    if nan is not None:
        out = torch.where(isnan, nan, out)
        found |= isnan
    if not bool(found.all()):
        bad = x[~found].flatten()[0].item()
        raise FormatError(f"encode: {bad!r} is not a value of {fmt}; round to it first (mpcompile.rounding.quantize)")
    return out.to(_code_dtype(fmt.bits))  # int64 -> int16 wraps codes >= 2**15 to the uint16 pattern


@functools.lru_cache(maxsize=None)
def _widening_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8, device=device).view(dtype).float()  # torch's own cast: same bits


def widen(values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``values`` (any dtype; a format's torch dtype) into ``out`` (contiguous, values'
    shape), as torch's cast does, bit for bit. On the CPU into float32, the fp8s take faster
    roads than torch's cast (~4 ns an element for e4m3, ~0.65 for e5m2): e4m3 a table of its 256
    values (~1 ns), e5m2 a shift into fp16's top byte and fp16's vectorised cast (~0.35 ns)."""
    if values.device.type == "cpu" and out.dtype == torch.float32:
        if values.dtype == torch.float8_e4m3fn:
            index = values.reshape(-1).view(torch.uint8).to(torch.int32)
            torch.index_select(_widening_table(values.dtype, values.device), 0, index, out=out.view(-1))
            return out
        if values.dtype == torch.float8_e5m2:  # e5m2 is the top byte of fp16, NaN payloads included
            return out.copy_(values.view(torch.uint8).to(torch.int16).bitwise_left_shift_(8).view(torch.float16))
    return out.copy_(values)


def _element_values(codes: torch.Tensor, fmt: FloatFormat | FixedFormat) -> torch.Tensor:
    """The values of an element format's codes (its torch dtype where it has one, else float64)."""
    if torch_dtype(fmt) is not None:
        return codes.view(torch_dtype(fmt))
    table = code_values(fmt).to(codes.device)
    return table[codes.to(torch.int64) & (2**fmt.bits - 1)]  # int16 codes are uint16 patterns


def _codebook_bytes(numel: int, fmt: CodebookFormat) -> int:
    """Bytes of the codes of ``numel`` elements: one each, or one per two for 4 bits."""
    return -(-numel * fmt.bits // 8)


def _blocks(x: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """x as (..., blocks, block_size) along the format's axis, the tail zero-padded (as quantize does)."""
    t = x.movedim(fmt.axis, -1)
    pad = (-t.shape[-1]) % fmt.block_size
    t = torch.nn.functional.pad(t, (0, pad)) if pad else t
    return t.reshape(*t.shape[:-1], -1, fmt.block_size)


def encode(x: torch.Tensor, fmt) -> Packed:
    """Pack ``x``, whose entries are values of ``fmt``, into codes (and block scales).

    Raises:
        FormatError: an entry that is not a value of ``fmt``, or a format wider than 16 bits.
    """
    if isinstance(fmt, CodebookFormat):
        codes, absmax = codes_of_values(x, fmt)
        return Packed(codes[:_codebook_bytes(x.numel(), fmt)].clone(), absmax)
    if not isinstance(fmt, BlockFormat):
        return Packed(_encode_elements(x, fmt))
    elem = fmt.element
    _code_dtype(elem.bits)
    blocks = _blocks(x.detach().double(), fmt)
    amax = blocks.abs().amax(-1, keepdim=True)
    # quantize's scale: floor(log2(amax)) - the element's emax; any scale that holds the block works
    exponent = torch.where(amax > 0, torch.frexp(amax).exponent - 1 - elem.emax, SCALE_EXP_MIN)
    exponent = torch.where(torch.isinf(amax), SCALE_EXP_MAX, exponent).clamp(SCALE_EXP_MIN, SCALE_EXP_MAX)
    nan_block = torch.isnan(amax)
    elements = torch.where(nan_block, 0.0, blocks * torch.exp2(-exponent.double()))
    # an inf is a saturated element whose value overflowed x's dtype: it decodes back to inf there
    elements = torch.where(torch.isinf(blocks), torch.sign(blocks) * elem.max, elements)
    codes = _encode_elements(elements, elem)
    scales = torch.where(nan_block, _E8M0_NAN, exponent + _E8M0_BIAS).squeeze(-1).to(torch.uint8)
    return Packed(codes, scales)


def decode(packed: Packed, fmt, shape: torch.Size | tuple[int, ...] | None = None,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``packed`` holds, as ``dtype``; a block or codebook format needs the tensor's ``shape``."""
    if isinstance(fmt, CodebookFormat):
        if shape is None:
            raise ValueError(f"decode: a codebook format ({fmt}) needs the tensor's shape")
        blocks = packed.scales.numel()
        codes = torch.nn.functional.pad(packed.codes, (0, blocks * fmt.block_size * fmt.bits // 8 - packed.codes.numel()))
        return block_values(codes, packed.scales, fmt)[:math.prod(shape)].view(shape).to(dtype)
    if not isinstance(fmt, BlockFormat):
        values = _element_values(packed.codes, fmt)
        return widen(values, torch.empty(values.shape, dtype=dtype, device=values.device))
    if shape is None:
        raise ValueError(f"decode: a block format ({fmt}) needs the tensor's shape")
    elements = _element_values(packed.codes, fmt.element).double()
    scales = packed.scales.to(torch.int64).unsqueeze(-1)
    values = torch.where(scales == _E8M0_NAN, torch.nan, elements * torch.exp2((scales - _E8M0_BIAS).double()))
    moved = list(shape)
    moved.append(moved.pop(fmt.axis))
    flat = values.reshape(*moved[:-1], -1)[..., :moved[-1]]
    return flat.movedim(-1, fmt.axis).to(dtype)
