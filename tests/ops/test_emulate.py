"""The vectorised emulated GEMM against the scalar reference, bit for bit."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from mpcompile.backends import load_plugins
from mpcompile.formats import parse
from mpcompile.ops import ArithSpec, chunk_is_exact, emulated_matmul
from mpcompile.ops import emulate
from mpcompile.ops.reference import dot
from mpcompile.rounding import quantize



def assert_bitwise(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to the bit (every NaN equal to every NaN)."""
    got, expected = got.to(torch.float64), expected.to(torch.float64)
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan), f"NaN positions differ: {got[got.isnan() != nan]}"
    bad = (got.view(torch.int64) != expected.view(torch.int64)) & ~nan
    assert not bad.any(), f"{int(bad.sum())} differ, e.g. got {got[bad][:4].tolist()} expected {expected[bad][:4].tolist()}"

SPECS = [
    ArithSpec(mul="fp8_e5m2", acc="e5m10"),
    ArithSpec(mul="fp8_e4m3", acc="bf16", rounding="toward_zero"),
    ArithSpec(acc="e5m10", rounding="stochastic"),
    ArithSpec(mul="fp8_e5m2", acc="e5m10", rounding="stochastic", mul_rounding="nearest"),
    ArithSpec(mul="bf16", acc="fp16", rounding="up", mul_rounding="down"),
    ArithSpec(mul="fp8_e5m2", acc="e5m10", rounding="odd", mul_rounding="nearest_away"),
    ArithSpec(acc="fp16", fma=True),
    ArithSpec(mul="fp8_e5m2", acc="e5m10", kahan=True),
    ArithSpec(mul="fp8_e5m2", acc="e5m10", kahan=True, rounding="stochastic"),
    ArithSpec(mul="fp8_e5m2", acc="e5m10", order="pairwise"),
    ArithSpec(mul="fp8_e4m3", acc="e5m10", order="pairwise", rounding="stochastic", mul_rounding="stochastic"),
    ArithSpec(mul="fp8_e5m2", acc="e5m10", order="chunk(4)"),
    ArithSpec(mul="fp8_e5m2", acc="e5m10", order="chunk(8)", rounding="stochastic", kahan=True),
    ArithSpec(acc="e5m10", order="chunk(5)", rounding="down"),
    ArithSpec(mul="fp8_e4m3fnuz", acc="e4m3(nan=negzero,inf=false,bias=8)", rounding="nearest"),
    ArithSpec(mul="e3m2(subnormals=false)", acc="e5m10", rounding="up"),
    ArithSpec(mul="e8m23", acc="e8m23"),  # fp32 sequential, emulated
]


def _operands(batch, m, k, n, fmt, scale_spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, m, k, generator=g) * torch.exp2(torch.randint(-scale_spread, scale_spread + 1, (batch, m, k), generator=g).float())
    b = torch.randn(batch, k, n, generator=g) * torch.exp2(torch.randint(-scale_spread, scale_spread + 1, (batch, k, n), generator=g).float())
    a[0, 0, :3] = 0.0  # zeros of both signs and exact cancellation
    b[0, :2, 0] = -0.0
    if fmt is not None:
        a, b = quantize(a, fmt), quantize(b, fmt)
    return a, b


def _reference(a, b, spec, seed):
    batch, m, _ = a.shape
    n = b.shape[-1]
    out = torch.empty(batch, m, n, dtype=torch.float64)
    for i in range(batch):
        for r in range(m):
            for c in range(n):
                e = (i * m + r) * n + c
                out[i, r, c] = dot(a[i, r].tolist(), b[i, :, c].tolist(), spec, seed=seed, element=e)
    return out


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("operand_format", [None, "fp8_e4m3"])
def test_emulated_matmul_equals_reference(spec, operand_format):
    a, b = _operands(2, 3, 37, 4, operand_format, 6)
    if spec.acc.max < 1e4:  # narrow accumulators: keep the sums in range most of the time
        a, b = a / 16, b / 16
    if spec.chunk is not None and not chunk_is_exact(spec, parse(operand_format) if operand_format else None,
                                                     parse(operand_format) if operand_format else None):
        pytest.skip("chunk sums that float64 cannot hold exactly are not promised bit-identical")
    got = emulated_matmul(a, b, spec, seed=1234)
    assert_bitwise(got, _reference(a, b, spec, 1234))


def test_float64_operands_use_exact_products():
    spec = ArithSpec(mul="bf16", acc="fp16", rounding="nearest")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1, 3, 20, dtype=torch.float64, generator=g)
    b = torch.randn(1, 20, 2, dtype=torch.float64, generator=g)
    assert_bitwise(emulated_matmul(a, b, spec), _reference(a, b, spec, 0))


@pytest.mark.parametrize("order", ["sequential", "chunk(1)", "chunk(2)", "pairwise"])
@pytest.mark.parametrize("mul", ["e5m10", None])
def test_negative_zero_sums(order, mul):
    """-2**-20 rounds to -0 in e5m2, and -0 + -0 stays -0: the sign of a zero product and of the
    padding of a short last chunk reach the result."""
    spec = ArithSpec(mul=mul, acc="fp8_e5m2", order=order)
    a = torch.tensor([[[-2.0**-10, 0.0, 0.0]]])
    b = torch.tensor([[[2.0**-10], [-1.0], [-3.0]]])
    got = emulated_matmul(a, b, spec)
    assert_bitwise(got, _reference(a, b, spec, 0))
    assert got.item() == 0 and math.copysign(1, got.item()) < 0


@pytest.mark.parametrize("kernel", [True, False])
def test_chunk_sums_by_gemm_are_folded_in_order(monkeypatch, kernel):
    """chunk(k) of exact products: the chunk sums come from GEMMs over k-slices (here in blocks of
    3 rows and one chunk, a short last chunk, two batches) and are folded in order, by the CPU
    kernel or by torch; both equal the reference, overflow to inf included."""
    load_plugins("torch")  # registers the CPU fold kernel
    folds, registered = [], emulate._CHUNK_FOLD[0]
    monkeypatch.setattr(emulate, "_CHUNK_FOLD", [])  # restored after the test
    monkeypatch.setattr(emulate, "_KERNEL_B_BYTES", 0)  # b too large for the products kernel: the GEMM path
    if kernel:
        emulate.register_chunk_fold(emulate.ChunkFold(
            lambda *a: (folds.append(a[1].shape), registered.fold(*a))[1], registered.products, registered.serves,
            registered.offsets))
    monkeypatch.setattr(emulate, "_GROUP_BYTES", 8 * 3 * (4 + 3))  # 3 rows of a chunk of a and its sums
    spec = ArithSpec(acc="e6m9", order="chunk(4)")  # hfp8's accumulator, in short chunks
    a, b = _operands(2, 5, 19, 3, "fp8_e4m3", 4, seed=7)
    a[1, 0] *= 2.0**26  # sums past e6m9's largest value
    got = emulated_matmul(a, b, spec)
    assert got.isinf().any()
    assert_bitwise(got, _reference(a, b, spec, 0))
    assert folds == [(1, 1, 3, 3), (1, 1, 2, 3)] * 5 * 2 if kernel else not folds  # chunk by chunk, each row block


@pytest.mark.parametrize("n", [11, 8, 16, 32])  # 8, 16, 32 columns: the kernel's blocks of 8, 4, 2 rows
def test_exact_chunk_sums_of_a_small_b_are_the_products_kernels(monkeypatch, n):
    """chunk(k) of exact products where b fits in cache: the products kernel sums each chunk in
    registers (no GEMM, no fold call) and equals the reference, zero signs and overflow included."""
    load_plugins("torch")
    gemms = []
    monkeypatch.setattr(emulate, "_chunk_sums", lambda *args: gemms.append(args))
    spec = ArithSpec(acc="e6m9", order="chunk(4)")
    a, b = _operands(2, 8, 19, n, "fp8_e4m3", 4, seed=9)
    a[1, 0] *= 2.0**26  # sums past e6m9's largest value
    got = emulated_matmul(a, b, spec)
    assert got.isinf().any() and not gemms
    assert_bitwise(got, _reference(a, b, spec, 0))
    # a chunk that rounds to -0, then one of -0 products: IEEE's sum from the first product keeps -0
    spec = ArithSpec(acc="fp8_e5m2", order="chunk(2)")
    a = torch.zeros(1, 8, 4)
    a[0, 0, 0] = -2.0**-10
    b = torch.tensor([2.0**-10, -1.0, -3.0, -1.0]).view(1, 4, 1).expand(1, 4, n).contiguous()
    got = emulated_matmul(a, b, spec)
    assert_bitwise(got, _reference(a, b, spec, 0))
    assert not gemms and bool((got[0, 0] == 0).all()) and bool(torch.signbit(got[0, 0]).all())


def test_a_fold_kernel_that_cannot_be_built_falls_back_with_one_warning(monkeypatch):
    def broken(grid):
        raise RuntimeError("no C++ compiler")

    load_plugins("torch")
    monkeypatch.setattr(emulate, "_CHUNK_FOLD", [])
    monkeypatch.setattr(emulate, "_FAILED", set())
    emulate.register_chunk_fold(emulate.ChunkFold(lambda *a: 0, lambda *a: None, broken, lambda *a: None))
    spec = ArithSpec(acc="e6m9", order="chunk(4)")
    a, b = _operands(1, 3, 10, 2, "fp8_e4m3", 4, seed=8)
    with pytest.warns(RuntimeWarning, match="chunk fold's CPU kernel.*no C\\+\\+ compiler") as record:
        first = emulated_matmul(a, b, spec)
        second = emulated_matmul(a, b, spec)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    expected = _reference(a, b, spec, 0)
    assert_bitwise(first, expected)
    assert_bitwise(second, expected)


def test_eager_chunk_sums_in_row_blocks(monkeypatch):
    """Eager code bounds the products it holds by splitting the rows; the result is the same."""
    monkeypatch.setattr(emulate, "_EAGER_ELEMS", 64)
    spec = ArithSpec(mul="fp8_e5m2", acc="e5m10", order="chunk(8)", kahan=True, rounding="stochastic")
    a, b = _operands(2, 5, 19, 3, None, 2, seed=3)
    assert_bitwise(emulated_matmul(a, b, spec, seed=5), _reference(a, b, spec, 5))


@pytest.mark.parametrize("scale", [1.0, 2.0**6])
def test_chunk_products_near_overflow(scale):
    """The chunk path drops the overflow test of products when the operands' largest magnitudes
    rule it out; with larger operands some products round to inf and the test is kept."""
    spec = ArithSpec(mul="fp8_e5m2", acc="fp32", order="chunk(8)")
    a, b = _operands(1, 4, 24, 3, None, 2, seed=11)
    a, b = a * scale, b * scale
    got = emulated_matmul(a, b, spec)
    assert_bitwise(got, _reference(a, b, spec, 0))
    assert got.isfinite().all() == (scale == 1.0) and got.isfinite().any()  # 2**6: some sums inf or NaN


def test_stagnation_case_4096_ones(monkeypatch):
    monkeypatch.setattr(emulate, "_compile_enabled", False)  # the sums are the test, not the compiler
    ones = torch.ones(1, 1, 4096), torch.ones(1, 4096, 1)
    assert emulated_matmul(*ones, ArithSpec(acc="e5m10")).item() == 2048.0
    assert emulated_matmul(*ones, ArithSpec(acc="e5m10", kahan=True)).item() == 4096.0
    assert emulated_matmul(*ones, ArithSpec(acc="e5m10", order="pairwise")).item() == 4096.0
    # stochastic: each add's rounding error has mean 0 and variance <= q**2 / 4 with quantum
    # q <= 4 below 4096 + 4; the errors are martingale differences, so a run's variance is at
    # most 4096 * 4 (sd 128) and the mean of 20 independent runs (the batch entries: their own
    # random words) has sd <= 28.7. Round-to-nearest's 2048 is 70 of those away.
    sums = emulated_matmul(torch.ones(20, 1, 4096), torch.ones(20, 4096, 1),
                           ArithSpec(acc="e5m10", rounding="stochastic"), seed=7)
    assert abs(sums.mean().item() - 4096) < 5 * 28.7
    assert sums.std().item() > 0


def test_chunk_exactness_rule():
    e5m2, e4m3 = parse("fp8_e5m2"), parse("fp8_e4m3")
    assert chunk_is_exact(ArithSpec(mul=e5m2, acc="fp16", order="chunk(32)"), None, None)
    assert chunk_is_exact(ArithSpec(acc="fp16", order="chunk(32)"), e4m3, e4m3)
    assert not chunk_is_exact(ArithSpec(acc="fp16", order="chunk(32)"), None, None)
    assert not chunk_is_exact(ArithSpec(mul="bf16", acc="fp32", order="chunk(32)"), None, None)


@pytest.mark.parametrize("spec", [
    ArithSpec(mul="fp8_e5m2", acc="e5m10", order="chunk(16)", kahan=True, mul_rounding="stochastic"),  # chunk sums
    ArithSpec(mul="bf16", acc="fp32", order="chunk(4)", rounding="stochastic"),  # steps, inexact float64 sums
    ArithSpec(mul="fp8_e5m2", acc="e5m10"),  # steps, exact float64 sums
], ids=str)
def test_compiled_blocks_equal_eager(monkeypatch, spec):
    monkeypatch.setattr(emulate, "_products_kernel", lambda plan, dtype, device: None)  # the C++ kernel's fallback: torch's steps
    a, b = _operands(1, 8, 40, 16, None, 4, seed=5)
    eager = emulated_matmul(a, b, spec, seed=99)
    for name in ("_BLOCK", "_SLAB"):  # kernels of 2 steps or chunks: the same code, compiled in seconds
        monkeypatch.setattr(emulate, name, 2)
    monkeypatch.setattr(emulate, "COMPILE_MIN_WORK", 1)
    monkeypatch.setattr(emulate, "COMPILE_MIN_STEPS", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile fallback would test eager twice
        compiled = emulated_matmul(a, b, spec, seed=99)
    assert_bitwise(compiled, eager)
    assert any(key[0].spec == spec for key in emulate._KERNELS)
