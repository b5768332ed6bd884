"""What only compiled kernels on a GPU show (the interpreter runs kernels as Python, one
program at a time): ``auto`` picks the generated kernels for CUDA tensors, and they equal the
reference at sizes that fill tiles, software pipelines and tensor cores.

Marked ``gpu`` and skipped without CUDA or under the interpreter. On a GPU machine:
``TRITON_INTERPRET=0 pytest -m gpu`` (or all of ``tests/codegen``, which then runs compiled too).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from backend_pairs import reference_and
from mpcompile.codegen import triton_gemm, triton_quantize
from mpcompile.ops.emulate import emulated_matmul
from mpcompile.ops.roles import quantize_role
from mpcompile.ops.spec import parse_arith, parse_quant
from test_triton_backend import POLICY, STOCHASTIC, tiny_equals_torch

DEVICE = "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or triton_quantize.INTERPRETED,
    reason="needs a CUDA GPU with Triton's interpreter off (TRITON_INTERPRET=0)")]


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit, except that a NaN matches any NaN (its sign and payload are the hardware's)."""
    nan = x.isnan()
    return torch.equal(nan, y.isnan()) and torch.equal(x.view(torch.int32)[~nan], y.view(torch.int32)[~nan])


@pytest.mark.parametrize("policy", [POLICY, STOCHASTIC], ids=["nearest", "stochastic roles"])
def test_auto_runs_a_small_cnn_on_the_kernels_and_equals_torch(monkeypatch, policy):
    assert tiny_equals_torch(monkeypatch, policy, 16, "auto")  # auto launched the kernels


@pytest.mark.parametrize("arith", ["acc=bf16 order=chunk(32)", "acc=bf16 rounding=stochastic order=chunk(32)",
                                   "acc=fp16 order=chunk(64) kahan=true", "acc=e5m10"])
def test_fp8_gemms_at_pipeline_sizes_equal_the_reference(arith):
    """Many tiles and k steps, through tensor cores (fp16 dots of E4M3 values). Small integers keep
    every product and every 64-term chunk sum exact in float32, so the hardware's order inside a
    dot cannot matter; the rounding into the accumulator does, at every step."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-8, 9, (2, 300, 520), generator=gen).float().to(DEVICE)
    b = torch.randint(-8, 9, (2, 520, 200), generator=gen).float().to(DEVICE)
    r, spec = parse_quant("fp8_e4m3"), parse_arith(arith)
    got = triton_gemm.triton_matmul(a, b, spec, a_role=r, b_role=r, seed=5)
    want = emulated_matmul(quantize_role(a, r, axis=-1, seed=0), quantize_role(b, r, axis=0, seed=0), spec,
                           exact_products=True, seed=5).float()
    assert torch.equal(got, want)


@pytest.mark.parametrize("fmt, rounding", [("fp8_e4m3", "nearest"), ("mxfp8_e4m3", "nearest"),
                                           ("fp8_e4m3", "stochastic"), ("bf16", "down"), ("fixed(8,4)", "up")])
def test_quantize_at_size_equals_the_reference(monkeypatch, fmt, rounding):
    gen = torch.Generator().manual_seed(1)
    n = 2**22 + 5  # thousands of programs and a ragged last one
    words = torch.randint(-2**31, 2**31 - 1, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = torch.where(torch.rand(n, generator=gen) < 0.2, words.view(torch.float32), torch.randn(n, generator=gen) * 100)
    x = x.to(DEVICE)
    monkeypatch.setattr(triton_quantize, "_LAUNCHERS", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ref, got = reference_and("auto", x, fmt, rounding, 3 if rounding == "stochastic" else None)
    assert triton_quantize.cached_launchers() == 1  # auto took the kernel
    assert _same_bits(ref, got)
