"""triton_round.round_float64 (the emulated GEMM's rounding of exact sums) against the reference
quantizer in float64, bit for bit, in Triton's interpreter (or on CUDA)."""
from __future__ import annotations

import pytest
import torch

from backend_pairs import DEVICE, NO_TRITON, TRITON_RUNS
from oracles import FLOAT_FORMATS, fid, float_inputs

if not TRITON_RUNS:
    pytest.skip(NO_TRITON, allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mpcompile.codegen.round_spec import round_spec  # noqa: E402
from mpcompile.codegen.triton_round import round_float64  # noqa: E402
from mpcompile.rounding import ROUNDING_MODES, plan_quantize, reference_quantize  # noqa: E402

_BLOCK = 8192


@triton.jit
def _round64_kernel(x_ptr, bits_ptr, y_ptr, n, SPEC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    rbits = tl.load(bits_ptr + offs, mask=mask, other=0)
    tl.store(y_ptr + offs, round_float64(x, rbits, SPEC), mask=mask)


# the formats whose values are all float32 values: the accumulators the GEMM rounds through float64
FORMATS = [f for f in FLOAT_FORMATS if f.emax <= 127 and f.min_subnormal >= 2.0**-149 and f.man <= 23]


@pytest.mark.parametrize("fmt", FORMATS, ids=fid)
def test_float64_values_round_as_the_reference_rounds_them(fmt):
    gen = torch.Generator().manual_seed(0)
    tiny = (1 + torch.rand(160, dtype=torch.float64, generator=gen)) * fmt.min_subnormal * 2.0 ** -torch.arange(160)
    x = torch.cat([float_inputs(fmt, torch.float64), tiny, -tiny])  # and far below the least value: rem / q to 32 bits
    x = x[(x == 0) | (x.abs() >= 2.0**-1022) | x.isnan()]  # zero, normal, inf or NaN, as the kernel takes them
    bits = torch.randint(0, 2**32, x.shape, dtype=torch.int64, generator=gen)
    for mode in ROUNDING_MODES:
        n = 32 if mode == "stochastic" else 1  # the GEMM's default for 19 fraction bits and fewer
        want = reference_quantize(x, *plan_quantize(fmt, mode, False, torch.float64, n), bits).float()
        got = torch.empty(x.shape, dtype=torch.float32, device=DEVICE)
        spec = round_spec(*plan_quantize(fmt, mode, False, torch.float32, n, False, torch.device(DEVICE)))
        _round64_kernel[(triton.cdiv(x.numel(), _BLOCK),)](x.to(DEVICE), bits.to(DEVICE), got, x.numel(), SPEC=spec,
                                                           BLOCK=_BLOCK)
        got = got.cpu()
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan), (fmt, mode)
        differ = got.view(torch.int32)[~nan] != want.view(torch.int32)[~nan]
        assert not differ.any(), (fmt, mode, x[~nan][differ][:4].tolist(), got[~nan][differ][:4].tolist(),
                                  want[~nan][differ][:4].tolist())
