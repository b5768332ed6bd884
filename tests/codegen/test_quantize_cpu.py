"""The C++ quantize kernel is bit-identical to the eager reference over every path of its source:
both short paths, the general one (man == 0 parity, no subnormals, fixed point, no zero,
unsigned), overflow under each mode, random words from a seed or a tensor of 5 to 40 bits, and
block formats along any axis."""
import pytest
import torch

import mpcompile.codegen.quantize_cpu as quantize_cpu_module
from mpcompile.codegen.quantize_cpu import _format, _library, compiled_libraries, quantize_cpu, takes_plan
from mpcompile.codegen.round_spec import round_spec
from mpcompile.formats import MXFormat, get, parse
from mpcompile.random_bits import counter_words
from mpcompile.rounding import default_sr_bits, plan_quantize, reference_quantize
from oracles import assert_bitwise


def values(n=3 * (1 << 14) + 5, seed=0):
    """Every float32 bit pattern class: random patterns (NaN payloads, subnormals, every
    exponent), magnitudes spread over float32's range, values of few significant bits (ties and
    exact values of the formats), and the specials. Past 2**14 elements and not a multiple of
    them: the kernel's chunks, threads and a tail."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(-2**31, 2**31, (n // 3,), generator=g, dtype=torch.int64).to(torch.int32)
    mag = torch.exp2(torch.empty(n // 3).uniform_(-152, 129, generator=g))
    spread = torch.where(torch.rand(mag.shape, generator=g) < 0.5, -mag, mag)
    short = n - 2 * (n // 3)
    few_bits = torch.randint(-64, 65, (short,), generator=g) * torch.exp2(
        torch.randint(-155, 122, (short,), generator=g).double())
    x = torch.cat([patterns.view(torch.float32), spread, few_bits.float()])
    x[:7] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 448.0, -2.0**-149])
    return x


def check(x, fmt, rounding, saturate=False, sr_bits=None, bits=None):
    """The kernel's result, asserted bit-identical to the reference's."""
    fmt = parse(fmt) if isinstance(fmt, str) else fmt
    sr = default_sr_bits(fmt) if sr_bits is None else sr_bits
    plan, params = plan_quantize(fmt, rounding, saturate, torch.float32, sr, bits is not None and bits.dim() == 0)
    assert takes_plan(plan)
    got = quantize_cpu(x, plan, params, bits)
    assert_bitwise(x, got, reference_quantize(x, plan, params, bits), f"{fmt} {rounding} saturate={saturate}")
    return got


@pytest.mark.parametrize("fmt,rounding,saturate", [
    ("fp8_e4m3", "nearest", False),  # ties to even by add-and-mask; below 2**emin, add-and-subtract
    ("bf16", "nearest", True),  # add-and-mask down to float32's subnormals
    ("fp16", "nearest_away", False),
    ("fp8_e5m2", "up", True),
    ("fp8_e5m2", "down", False),
    ("fp4_e2m1", "down", True),
    ("e3m0", "nearest", False),  # man == 0: ties go to the even exponent
    ("e3m0", "odd", True),
    ("e4m3(subnormals=False)", "nearest", False),
    ("e8m0", "nearest", False),  # no zero, unsigned
    ("e8m0", "up", True),
    ("p3109(8,4,unsigned)", "odd", False),
    ("fixed(8,3)", "toward_zero", False),
    ("fixed(8,3,unsigned)", "nearest_away", True),
])
def test_deterministic_modes_equal_the_reference(fmt, rounding, saturate):
    check(values(), fmt, rounding, saturate)


@pytest.mark.parametrize("fmt,saturate,sr_bits", [
    ("fp8_e4m3", False, None),  # 23 - man bits: the carry path, and its uniform grid below 2**emin
    ("bf16", True, None),  # the carry path down to float32's subnormals
    ("e4m3(subnormals=False)", True, None),  # the general path
    ("p3109(8,3)", False, 5),
    ("fp8_e4m3", False, 31),  # gfloat's sum in 64 bits, the word in 32
    ("fixed(16,20)", True, 40),  # a 64-bit word
])
@pytest.mark.parametrize("source", ["seed", "tensor"])
def test_stochastic_rounding_equals_the_reference(fmt, saturate, sr_bits, source):
    x = values()
    sr = default_sr_bits(parse(fmt)) if sr_bits is None else sr_bits
    if source == "seed":
        if sr > 32:
            pytest.skip("a seed gives 32-bit words")
        bits = torch.tensor(0x9E3779B9, dtype=torch.int64)
    else:  # high bits set too: only the low sr_bits count
        bits = torch.randint(-2**62, 2**62, x.shape, generator=torch.Generator().manual_seed(1))
    check(x, fmt, "stochastic", saturate, sr_bits, bits)


def test_shapes_and_non_contiguous_input():
    x = values(64 * 48).reshape(64, 48).t()
    assert check(x, "fp8_e4m3", "nearest").shape == x.shape


@pytest.mark.parametrize("fmt,rounding,shape", [
    ("mxfp8_e4m3", "nearest", (96, 125)),  # 125 = 3 blocks of 32 and one of 29
    ("mxfp4_e2m1", "up", (40, 64)),
    ("mxfp6_e3m2", "toward_zero", (40, 64)),
    ("bfp(8,16)", "nearest", (48, 250)),  # fixed-point elements
    (MXFormat(get("fp6_e2m3"), 16, axis=0), "down", (66, 64, 2)),  # blocks across the inner axes
])
def test_blocks_equal_the_reference(fmt, rounding, shape):
    x = values(3 * 8000)[:torch.Size(shape).numel()].reshape(shape)
    x[1, :7] = float("nan")  # a block holding NaN is NaN
    x[32:48, 3:5] = x[32:48, 3:5] * 2.0**-140  # blocks of subnormals: scales too small for the short path
    check(x, fmt, rounding)


@pytest.mark.parametrize("fmt", ["mxfp8_e5m2", "bfp(8,16)", MXFormat(get("fp4_e2m1"), 32, axis=0)], ids=str)
@pytest.mark.parametrize("source", ["seed", "tensor"])
def test_stochastic_blocks_equal_the_reference(fmt, source):
    x = values(4 * 8000)[:64 * 500].reshape(64, 500)
    bits = torch.tensor(12345) if source == "seed" else torch.randint(0, 2**40, x.shape)
    check(x, fmt, "stochastic", bits=bits)


@pytest.mark.parametrize("first", [2**32 - 5000, 3 * 2**32 + 12345])
def test_seeded_words_past_two_to_the_32(first):
    """The random word of flat index i folds the index's bits above 32 in: here x is a slice
    starting at ``first`` of a larger tensor, across 2**32 and past it (the kernel's chunks)."""
    x = values(40000)
    seed = 0xDEADBEEF
    words = counter_words(torch.arange(first, first + x.numel()), torch.tensor(seed))
    plan, params = plan_quantize(parse("fp8_e4m3"), "stochastic", False, torch.float32, 20, False)
    ref = reference_quantize(x, plan, params, words)
    seeded, seeded_params = plan_quantize(parse("fp8_e4m3"), "stochastic", False, torch.float32, 20, True)
    spec = round_spec(seeded, seeded_params)
    out = torch.empty_like(x)
    _library(spec, "seeded").quantize(x.data_ptr(), out.data_ptr(), None, seed, x.numel(), first, _format(spec), 2)
    assert_bitwise(x, out, ref, f"seeded words from index {first}")


def test_one_library_per_rounding_path_not_per_format(monkeypatch):
    monkeypatch.setattr(quantize_cpu_module, "_LIBRARIES", {})  # loaded again (from inductor's disk cache)
    x = values(100)
    check(x, "fp8_e5m2", "nearest")
    for fmt in ("fp16", "e4m3", "bf16"):
        check(x, fmt, "nearest", saturate=True)  # the same short path, other numbers and flags
    assert compiled_libraries() == 1
    check(x, "fp8_e5m2", "odd")
    assert compiled_libraries() == 2


def test_refuses_what_it_does_not_round():
    fmt = parse("fp8_e4m3")
    plan, params = plan_quantize(fmt, "nearest", False, torch.float64, 20)
    assert not takes_plan(plan)
    with pytest.raises(ValueError, match="float32"):
        quantize_cpu(torch.zeros(4, dtype=torch.float64), plan, params, None)
    stochastic, sr_params = plan_quantize(fmt, "stochastic", False, torch.float32, 20)
    with pytest.raises(ValueError, match="random bits"):
        quantize_cpu(torch.zeros(4), stochastic, sr_params, None)
