"""Packed storage: every code of every registered format of at most 16 bits decodes to its value
(against ml_dtypes' bit patterns where it has the format) and encodes back bit for bit; block
formats round-trip quantized tensors, specials and ragged blocks included."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from mpcompile.errors import FormatError
from mpcompile.formats import (BlockFloat, BlockFormat, BlockMinifloat, FixedFormat, code_values, decode, encode, get,
                               names, parse, widen)
from mpcompile.rounding import quantize

ELEMENTS = [n for n in names() if not isinstance(get(n), BlockFormat) and get(n).bits <= 16]
EXTRA = ["fixed(8,3)", "fixed(8,0,unsigned)", "fixed(12,4)", "p3109(8,3)", "p3109(6,2,unsigned)", "e2m1"]
BLOCKS = [n for n in names() if isinstance(get(n), BlockFormat)] + ["bfp(8,16)", "bm(2,3,8)", "mx(fp8_e4m3,32,axis=0)"]
ML_DTYPES = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2,
             "fp8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "fp8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
             "fp8_e3m4": ml_dtypes.float8_e3m4, "fp6_e3m2": ml_dtypes.float6_e3m2fn,
             "fp6_e2m3": ml_dtypes.float6_e2m3fn, "fp4_e2m1": ml_dtypes.float4_e2m1fn,
             "e8m0": ml_dtypes.float8_e8m0fnu, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as values, NaN where NaN and with the same sign of zero."""
    nan = torch.isnan(a)
    return bool(torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])
                and torch.equal(torch.signbit(a[~nan]), torch.signbit(b[~nan])))


@pytest.mark.parametrize("name", [n for n in ELEMENTS if n in ML_DTYPES])
def test_codes_are_the_bit_patterns_ml_dtypes_uses(name):
    fmt, dtype = get(name), ML_DTYPES[name]
    raw = np.arange(2**fmt.bits, dtype=np.uint16 if fmt.bits > 8 else np.uint8)
    with np.errstate(invalid="ignore"):  # the NaN codes
        expected = torch.from_numpy(raw.view(dtype).astype(np.float64))
    assert _same(code_values(fmt), expected)


@pytest.mark.parametrize("name", ELEMENTS + EXTRA)
def test_every_code_decodes_and_every_value_encodes_back(name):
    fmt = parse(name)
    table = code_values(fmt)
    packed = encode(table, fmt)
    assert packed.codes.dtype == (torch.uint8 if fmt.bits <= 8 else torch.int16)
    assert _same(decode(packed, fmt, dtype=torch.float64), table)
    values = fmt.values()
    assert _same(decode(encode(values, fmt), fmt, dtype=torch.float64), values)
    assert packed.nbytes == table.numel() * (1 if fmt.bits <= 8 else 2)


@pytest.mark.parametrize("name", BLOCKS)
def test_block_formats_round_trip_quantized_tensors(name):
    fmt = parse(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 45, generator=g) * torch.logspace(-30, 30, 45).float()  # a ragged last block
    x[0, :3] = torch.tensor([0.0, -0.0, torch.inf])
    x[1, 5] = torch.nan
    x[2] = 0.0
    q = quantize(x, fmt)
    packed = encode(q, fmt)
    blocks = -(-x.shape[fmt.axis] // fmt.block_size)
    assert packed.scales.dtype == torch.uint8 and packed.scales.shape[-1] == blocks
    assert _same(decode(packed, fmt, q.shape), q)


def test_packing_saves_the_bytes_it_promises():
    x = quantize(torch.randn(256, 64), "mxfp8_e4m3")
    assert encode(x, get("mxfp8_e4m3")).nbytes == 256 * 64 + 256 * 64 // 32  # a byte per element, one per 32
    assert encode(quantize(torch.randn(1000), "bf16"), get("bf16")).nbytes == 2000


def test_what_cannot_be_packed_is_refused():
    with pytest.raises(FormatError, match=r"0\.100000001\d* is not a value of fp8_e4m3; round to it first"):
        encode(torch.tensor([0.5, 0.1]), get("fp8_e4m3"))
    with pytest.raises(FormatError, match="at most 16 bits"):
        encode(torch.tensor([1.0]), get("fp32"))
    with pytest.raises(ValueError, match="needs the tensor's shape"):
        decode(encode(quantize(torch.ones(32), "mxfp4_e2m1"), get("mxfp4_e2m1")), get("mxfp4_e2m1"))
    assert isinstance(parse("bfp(8,16)"), BlockFloat) and isinstance(parse("bm(2,3,8)"), BlockMinifloat)
    assert isinstance(parse("fixed(8,3)"), FixedFormat)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("out", [torch.float32, torch.float64], ids=str)
def test_widen_gives_torchs_cast_of_every_code_bit_for_bit(dtype, out):
    bits = 8 if dtype.itemsize == 1 else 16
    codes = torch.arange(2**bits, dtype=torch.int32).to(torch.uint8 if bits == 8 else torch.int16).view(dtype)
    wide = widen(codes.view(16, -1), torch.empty(16, 2**bits // 16, dtype=out))
    int_view = torch.int32 if out == torch.float32 else torch.int64
    assert torch.equal(wide.view(-1).view(int_view), codes.to(out).view(int_view))
