"""quantize's contract around the numbers: shapes, dtypes, input left alone, argument errors."""
import pytest
import torch

from mpcompile import quantize
from mpcompile.formats import parse
from mpcompile.rounding import default_sr_bits

FORMATS = ["fp8_e4m3", "bf16", "fixed(8,4)", "mxfp8_e4m3", "bfp(6,8)", "e8m0"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5), (2, 3, 33)], ids=str)
def test_shapes_kept(fmt, shape):
    x = torch.rand(shape) + 0.5
    assert quantize(x, fmt).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_dtype_kept_and_half_types_computed_in_float32(dtype, rounding):
    x = (torch.randn(257, dtype=torch.float64) * 10).to(dtype)
    g = lambda: torch.Generator().manual_seed(3)
    got = quantize(x, "fp8_e5m2", rounding, generator=g()) if rounding == "stochastic" else quantize(x, "fp8_e5m2")
    assert got.dtype == dtype
    if dtype in (torch.float16, torch.bfloat16):
        kw = {"generator": g()} if rounding == "stochastic" else {}
        assert torch.equal(got, quantize(x.float(), "fp8_e5m2", rounding, **kw).to(dtype))


@pytest.mark.parametrize("fmt", FORMATS)
def test_input_not_modified(fmt):
    x = torch.randn(4, 64)
    before = x.clone()
    quantize(x, fmt, "stochastic")
    quantize(x, fmt, "down", saturate=True)
    assert torch.equal(x, before)


def test_non_contiguous_block_input():
    x = torch.randn(6, 40).t()
    assert torch.equal(quantize(x, "mxfp8_e4m3"), quantize(x.contiguous(), "mxfp8_e4m3"))


def test_default_sr_bits():
    assert default_sr_bits(parse("fp8_e4m3")) == 20
    assert default_sr_bits(parse("bf16"), torch.float64) == 45
    assert default_sr_bits(parse("mxfp4_e2m1")) == 22


@pytest.mark.parametrize("call,error,match", [
    (lambda: quantize(torch.arange(4), "fp16"), TypeError, "floating-point"),
    (lambda: quantize([1.0], "fp16"), TypeError, "floating-point"),
    (lambda: quantize(torch.ones(3), "fp16", "nearest_even"), ValueError, "rounding="),
    (lambda: quantize(torch.ones(3), "fp16", random_bits=torch.zeros(3, dtype=torch.int32)), ValueError, "only to rounding='stochastic'"),
    (lambda: quantize(torch.ones(3), "fp16", "stochastic", sr_bits=0), ValueError, "sr_bits"),
    (lambda: quantize(torch.ones(3), "fp16", "stochastic", random_bits=torch.zeros(4, dtype=torch.int32)), ValueError, "shape"),
    (lambda: quantize(torch.ones(3), "fp16", "stochastic", random_bits=torch.zeros(3)), ValueError, "integer tensor"),
    (lambda: quantize(torch.tensor(1.0), "mxfp8_e4m3"), ValueError, "axis"),
    (lambda: quantize(torch.ones(3), "fp17"), ValueError, "unknown format"),
], ids=["int-tensor", "list", "mode", "bits-not-sr", "sr-bits-0", "bits-shape", "bits-float", "block-0d", "unknown-fmt"])
def test_argument_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("fmt,held_max", [
    ("e11m2", 1.75 * 2.0**127),  # max 1.75 * 2**1023 is beyond float32: the largest value float32 holds
    ("fixed(32,16)", 32767.998046875),  # max 32767.99998... is not a float32: the largest one below it
    ("fp8_e4m3", 448.0),
])
def test_saturation_clamps_to_the_largest_format_value_the_dtype_holds(fmt, held_max):
    x = torch.tensor([3e38, float("inf"), -float("inf")])
    got = quantize(x, fmt, saturate=True)
    assert got.tolist() == [held_max, held_max, -held_max if fmt != "fixed(32,16)" else -32768.0]
    assert bool((quantize(got, fmt, saturate=True) == got).all())  # values of the format


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "mxfp8_e4m3", "fixed(8,4)", "blockwise(dynamic8,256)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_out_takes_the_result(fmt, dtype):
    """out= holds the same values quantize returns without it (the C++ kernel writes float32 there
    itself, other kernels' results are copied), and is what is returned."""
    x = (torch.randn(4, 512, dtype=torch.float64) * 20).to(dtype)
    out = torch.full_like(x, float("nan"))
    got = quantize(x, fmt, out=out)
    assert got is out
    torch.testing.assert_close(out, quantize(x, fmt), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("out", [torch.empty(4, 8), torch.empty(8, 4, dtype=torch.float64), torch.empty(4, 8).t()],
                         ids=["shape", "dtype", "layout"])
def test_an_out_of_another_shape_dtype_or_layout_is_refused(out):
    with pytest.raises(ValueError, match=r"out must be a contiguous tensor of x's shape \(8, 4\), dtype torch.float32"):
        quantize(torch.randn(8, 4), "fp8_e4m3", out=out)
