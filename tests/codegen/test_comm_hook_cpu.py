"""The communication hook's CPU kernels equal, bit for bit, the torch operations they replace:
scale, clamp and cast to fp8, bf16 or fp16 with the error-feedback residual; widen, scale, sum
over ranks and divide; each block's largest magnitude."""
from __future__ import annotations

import pytest
import torch

from mpcompile.codegen.comm_hook_cpu import accumulate_codes_, block_amax, quantize_codes_

DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN for NaN."""
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())).all())


def _hard(n: int, seed: int = 0) -> torch.Tensor:
    """Magnitudes over 60 binades, the fp8, fp16 and bf16 edges (saturation, the rounding to inf,
    NaNs of either sign and other payloads, subnormals) and a run of consecutive float32 patterns
    across midpoints."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.empty(n).uniform_(-40, 20, generator=g))
    x = torch.where(torch.rand(n, generator=g) < 0.5, -mag, mag)
    x[:16] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 448.0, 464.0, 57344.0, 470.0, 479.0,
                           480.0, 61440.0, 61439.0, -float("nan"), 1e-30, 5e-40])
    x[16:32] = torch.tensor([65504.0, 65519.0, 65520.0, -65520.0, 2.0**-25, 3 * 2.0**-26, 2.0**-26, 3.3895e38,
                             3.3961e38, 3.4028e38, -3.4e38, 2.0**-133, 0.0, 0.0, 0.0, 0.0])
    x[28:32] = torch.tensor([0x7FFFFFFF, 0x7F800001, -0x00400000, -0x00000001], dtype=torch.int32).view(torch.float32)
    x[32:32 + 4096] = (torch.arange(4096, dtype=torch.int32) * 4096 + 0x3A000000).view(torch.float32)
    return x


def _per_element(factors: torch.Tensor, unit: int | None, n: int) -> torch.Tensor:
    return factors if unit is None else factors.repeat_interleave(unit)[:n]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_code_widens_as_torchs_cast(dtype):
    bits = 8 * dtype.itemsize
    codes = torch.arange(2**bits, dtype=torch.int32).to(torch.uint8 if bits == 8 else torch.int16).view(dtype)
    mean = accumulate_codes_([codes], torch.empty(codes.numel()), [None], None)  # one rank: times 1, over 1
    expected = codes.float().mul_(1.0).div_(1)  # the arithmetic quiets bf16's signalling NaNs, as torch's does
    assert torch.equal(mean.view(torch.int32), expected.view(torch.int32))  # NaN payloads too


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bound", [None, 448.0, 57344.0])
@pytest.mark.parametrize("unit", [None, 32, 20])  # one factor; one per block; blocks with a tail of 4
def test_quantize_is_torchs_scale_clamp_cast_and_residual(dtype, bound, unit):
    n = 8192 + 13
    x = _hard(n)
    e = torch.randint(-3, 4, (1 if unit is None else -(-n // unit),), generator=torch.Generator().manual_seed(1))
    down, up = torch.exp2(-e.float()), torch.exp2(e.float())
    codes, residual = torch.empty(n, dtype=dtype), torch.empty(n)
    quantize_codes_(x, codes, residual, down, up, unit, bound)
    scaled = x * _per_element(down, unit, n)
    expected = (scaled if bound is None else scaled.clamp(-bound, bound)).to(dtype)
    assert torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))
    assert _same(residual, (scaled - expected.float()) * _per_element(up, unit, n))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit", [None, 32, 20])
def test_the_sum_over_ranks_is_torchs_mul_add_and_divide(dtype, unit):
    n, ranks = 4096 + 5, 3
    g = torch.Generator().manual_seed(2)
    bits = 8 * dtype.itemsize
    codes = [torch.randint(0, 2**bits, (n,), generator=g).to(torch.uint8 if bits == 8 else torch.int16).view(dtype)
             for _ in range(ranks)]
    blocks = 1 if unit is None else -(-n // unit)
    factors = [torch.exp2(torch.randint(-130, 120, (blocks,), generator=g).float()) for _ in range(ranks)]
    got = accumulate_codes_(codes, torch.empty(n), factors, unit)
    expected = codes[0].float().mul_(_per_element(factors[0], unit, n))
    for c, f in zip(codes[1:], factors[1:]):  # the hook's torch path: add_(alpha=) per tensor, addcmul_ per block
        if unit is None:
            expected.add_(c.float(), alpha=f.item())
        else:
            expected.addcmul_(c.float(), _per_element(f, unit, n))
    assert _same(got, expected.div_(ranks))


@pytest.mark.parametrize("unit", [32, 7])
def test_block_amax_is_the_largest_magnitude_or_nan(unit):
    x = _hard(32 * 300)
    x[128:160] = -0.0
    padded = torch.nn.functional.pad(x, (0, -x.numel() % unit)).view(-1, unit)
    assert _same(block_amax(x, unit), torch.maximum(padded.amax(1), padded.amin(1).neg()))


def test_factors_that_do_not_match_the_blocks_are_refused():
    with pytest.raises(ValueError, match="one per unit"):
        quantize_codes_(torch.zeros(64), torch.empty(64, dtype=torch.float8_e5m2), None, torch.ones(3), torch.ones(3),
                      32, None)


@pytest.mark.parametrize("unit", [None, 32])
def test_threads_split_the_work_without_changing_a_bit(unit):
    n = (1 << 17) + 13  # past the size from which a call splits its blocks among torch's threads
    x = _hard(n - n % 32 if unit else n)
    n = x.numel()
    blocks = 1 if unit is None else n // unit
    e = torch.randint(-3, 4, (blocks,), generator=torch.Generator().manual_seed(3)).float()
    out = {}
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            codes, residual = torch.empty(n, dtype=torch.float8_e4m3fn), torch.empty(n)
            quantize_codes_(x, codes, residual, torch.exp2(-e), torch.exp2(e), unit, 448.0)
            total = accumulate_codes_([codes, codes], torch.empty(n), [torch.exp2(e)] * 2, unit)
            out[threads] = (codes.view(torch.uint8), residual, total, block_amax(x, unit or 32))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(out[1][0], out[2][0])
    assert all(_same(a, b) for a, b in zip(out[1][1:], out[2][1:]))
