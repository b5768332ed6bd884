"""Codes of a block-wise codebook format: rounding to the nearest entry, and the values of codes.

Nearest is bitsandbytes' rule (its portable ``quantize_blockwise`` kernel, and its CUDA kernel
but for ties): ``v = x * (1 / max(absmax, 1e-38))`` in float32, then the number of midpoints
``(entry[k] + entry[k + 1]) * 0.5`` (float32) that lie below ``v``: a tie goes to the lower
entry. A table over the top 16 bits of ``v`` (sign, exponent and 7 fraction bits: 65536 slices
of the float32 line) holds each slice's lowest code and the first float32 past the midpoint
inside it, if any, so a code is two lookups and one comparison. No slice holds two midpoints:
the table refuses a codebook whose entries lie closer than a slice is wide.

Codes are stored as bytes: one a byte for 8 bits; for 4 bits two a byte, the first in the high
nibble (bitsandbytes' 4-bit layout). A tensor is flattened and cut into blocks of ``block_size``,
the last one padded with zeros, which change no absmax and take the code of 0.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FormatError
from .codebook_format import CodebookFormat

__all__ = ["midpoints", "nearest_reference", "RoundingTable", "rounding_table", "block_codes", "block_values",
           "codes_of_values", "quantize_codebook"]

_SLICE_BITS = 16
_SMALLEST_SCALE = 1e-38  # bitsandbytes' floor of a block's absmax before taking its reciprocal


def midpoints(codebook: torch.Tensor) -> torch.Tensor:
    """The float32 midpoints between consecutive entries, as bitsandbytes computes them."""
    return (codebook[:-1] + codebook[1:]) * 0.5


def nearest_reference(v: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The nearest entry's index (int64) for each float32 ``v`` (already divided by the absmax),
    by the rule itself: how many midpoints lie below ``v``."""
    return torch.bucketize(v, midpoints(codebook))


@dataclass(frozen=True)
class RoundingTable:
    """Per slice of the float32 line (top 16 bits of v): its lowest code and the float32 from
    which its codes are one higher (+inf where all its codes are equal); and per code byte the
    values of the codes it holds."""

    base: torch.Tensor  # uint8 (65536,)
    threshold: torch.Tensor  # float32 (65536,)
    byte_values: torch.Tensor  # (256,) the float32 values of each byte's codes, as one float32 or int64


def _slice_ends(slices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest and highest float32 of each slice (int64 top-16-bit patterns)."""
    first = (slices << _SLICE_BITS).to(torch.int32).view(torch.float32)  # int64 -> int32 wraps to the pattern
    last = ((slices << _SLICE_BITS) | (2**_SLICE_BITS - 1)).to(torch.int32).view(torch.float32)
    return torch.minimum(first, last), torch.maximum(first, last)  # a negative slice runs the other way


@functools.lru_cache(maxsize=None)
def rounding_table(fmt: CodebookFormat, device: torch.device = torch.device("cpu")) -> RoundingTable:
    """The format's rounding table on ``device`` (built on the CPU once, copied to each device once)."""
    if device.type != "cpu":
        table = rounding_table(fmt)
        return RoundingTable(table.base.to(device), table.threshold.to(device), table.byte_values.to(device))
    codebook = fmt.values()
    slices = torch.arange(2**_SLICE_BITS, dtype=torch.int64)
    lo, hi = _slice_ends(slices)
    finite = (slices & 0x7F80) != 0x7F80  # inf and NaN (of a block holding them) take the code of 0
    zero = int(torch.nonzero(codebook == 0)[0])
    lo_code = torch.where(finite, nearest_reference(lo, codebook), zero)
    hi_code = torch.where(finite, nearest_reference(hi, codebook), zero)
    if bool((hi_code - lo_code > 1).any()):
        raise FormatError(f"{fmt}: two midpoints of its codebook fall in one slice of 2**-7 of their magnitude; "
                          f"its rounding table holds one per slice")
    middle = midpoints(codebook)[lo_code.clamp(max=codebook.numel() - 2)]
    threshold = torch.where(hi_code > lo_code, torch.nextafter(middle, torch.tensor(torch.inf)), torch.inf)
    per_byte = 8 // fmt.bits
    byte = torch.arange(256)
    codes = torch.stack([(byte >> (fmt.bits * (per_byte - 1 - k))) & (2**fmt.bits - 1) for k in range(per_byte)], -1)
    values = codebook[codes]  # (256, codes a byte): one row a lookup of a 1-D table (a 2-D one is far slower)
    byte_values = values.view(torch.float32 if per_byte == 1 else torch.int64).view(-1)
    return RoundingTable(lo_code.to(torch.uint8), threshold, byte_values)


def _padded_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x flattened to float32 and cut into (blocks, block_size), the last block zero-padded."""
    flat = x.detach().reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def _codes(blocks: torch.Tensor, scales: torch.Tensor, fmt: CodebookFormat, in_place: bool = False) -> torch.Tensor:
    """The bytes of the nearest codes of ``blocks * (1 / scales)``, a scale below 1e-38 taken as
    1e-38 (as bitsandbytes: an all-zero block takes the code of 0, NaN does too); ``in_place``
    scales ``blocks`` itself."""
    table = rounding_table(fmt, blocks.device)
    inverse = scales.clamp(min=_SMALLEST_SCALE).reciprocal_().unsqueeze_(1)  # = 1.0 / scale, as torch computes it
    v = (blocks.mul_(inverse) if in_place else blocks * inverse).view(-1)
    if v.device.type == "cpu":  # numpy: a logical uint32 shift (torch has none) and a compare 5x torch's into bool
        bits = v.numpy().view(np.uint32)
        slices = torch.from_numpy((bits >> (32 - _SLICE_BITS)).view(np.int32))
        above = torch.from_numpy(np.greater_equal(v.numpy(), table.threshold.index_select(0, slices).numpy()))
    else:
        slices = (v.view(torch.int32) >> (32 - _SLICE_BITS)).bitwise_and_(2**_SLICE_BITS - 1)
        above = v >= table.threshold.index_select(0, slices)
    codes = table.base.index_select(0, slices).add_(above.view(torch.uint8))  # a bool is a 0/1 byte: no conversion
    if fmt.bits == 8:
        return codes
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4).bitwise_or_(pairs[:, 1])


def block_codes(x: torch.Tensor, fmt: CodebookFormat, *, consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``x`` to the nearest values of ``fmt``, as codes.

    ``x`` is read as float32 (a float64 tensor is rounded to float32 first, as bitsandbytes
    reads it), flattened and cut into blocks.

    Args:
        x: the tensor.
        fmt: the format.
        consume: ``x`` (float32, contiguous, whole blocks) may be overwritten: it is scaled in
            place instead of into a copy (an optimizer's decoded states, dead once encoded).

    Returns:
        The code bytes of every element of the padded blocks (uint8, ``blocks * block_size *
        bits / 8``) and each block's absmax (float32).
    """
    blocks = _padded_blocks(x, fmt.block_size)
    absmax = _absmax(blocks, fmt)
    return _codes(blocks, absmax, fmt, in_place=consume and blocks.data_ptr() == x.data_ptr()), absmax


def _absmax(blocks: torch.Tensor, fmt: CodebookFormat) -> torch.Tensor:
    """Each block's scale: its absmax; an unsigned format's, its largest value (0 if none is
    positive), which is the absmax wherever the block holds no negative (Adam's second moment)."""
    if not fmt.signed:
        return blocks.amax(1).clamp_min_(0.0)
    return torch.maximum(blocks.amax(1), blocks.amin(1).neg_()).abs_()  # no |x| copy; abs_: -0 -> +0


def block_values(codes: torch.Tensor, absmax: torch.Tensor, fmt: CodebookFormat) -> torch.Tensor:
    """The float32 values of code bytes (``block_codes``' layout): ``fp32(entry * absmax)``,
    flat, the padded blocks' length."""
    values = rounding_table(fmt, codes.device).byte_values.index_select(0, codes.to(torch.int32)).view(torch.float32)
    return values.view(-1, fmt.block_size).mul_(absmax[:, None]).view(-1)


def quantize_codebook(x: torch.Tensor, fmt: CodebookFormat) -> torch.Tensor:
    """``x`` rounded to the nearest values of ``fmt``: x's shape and dtype (computed in float32)."""
    values = block_values(*block_codes(x, fmt), fmt)
    return values[:x.numel()].view(x.shape).to(x.dtype)


def codes_of_values(x: torch.Tensor, fmt: CodebookFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """The code bytes and absmax of ``x``, whose blocks are values of ``fmt`` (as ``quantize``
    returns them), in ``block_codes``' layout.

    A block's scale is its largest magnitude, unless that is a negative element and the
    codebook's lowest entry is not -1 (-0.99297 in ``dynamic8``): then it is one of the float32
    numbers nearest to that magnitude over the entry's, whichever gives back every element.

    Raises:
        FormatError: a block that no scale gives back: its elements are not values of ``fmt``.
    """
    blocks = _padded_blocks(x, fmt.block_size)
    scales = _absmax(blocks, fmt)
    codes = _codes(blocks, scales, fmt).view(blocks.shape[0], -1)
    wrong = ~_gives_back(codes, scales, blocks, fmt)
    lowest = float(fmt.values()[0])
    if bool(wrong.any()) and -1 < lowest < 0:
        rows = wrong.nonzero().squeeze(1)
        guess = scales[rows] / -lowest
        for scale in (guess, torch.nextafter(guess, torch.full_like(guess, torch.inf)),
                      torch.nextafter(guess, torch.zeros_like(guess))):
            tried = _codes(blocks[rows], scale, fmt).view(rows.numel(), -1)
            fits = _gives_back(tried, scale, blocks[rows], fmt) & wrong[rows]
            codes[rows[fits]], scales[rows[fits]], wrong[rows[fits]] = tried[fits], scale[fits], False
    if bool(wrong.any()):
        row = int(wrong.nonzero()[0])
        values = block_values(codes[row], scales[row:row + 1], fmt)
        col = int((values.view(torch.int32) != blocks[row].view(torch.int32)).nonzero()[0])
        raise FormatError(f"encode: {blocks[row, col].item()!r} (element {row * fmt.block_size + col}) and its "
                          f"block are not values of {fmt}; round to it first (mpcompile.rounding.quantize)")
    return codes.view(-1), scales


def _gives_back(codes: torch.Tensor, scales: torch.Tensor, blocks: torch.Tensor, fmt: CodebookFormat) -> torch.Tensor:
    """Per block: whether the codes and scale give back its elements bit for bit (NaN for NaN)."""
    values = block_values(codes.reshape(-1), scales, fmt).view_as(blocks)
    same = (values.view(torch.int32) == blocks.view(torch.int32)) | (values.isnan() & blocks.isnan())
    return same.all(1)
