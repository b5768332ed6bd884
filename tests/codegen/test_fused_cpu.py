"""The fused CPU quantize kernel is bit-identical to the eager reference; the switch and fallback work."""
import functools
import warnings

import pytest
import torch

import mpcompile.codegen.fused_cpu as fused_cpu
import mpcompile.codegen.quantize_cpu as quantize_cpu
from mpcompile import quantize, set_quantize_kernel
from mpcompile.formats import MXFormat, get, parse
from backend_pairs import reference_and

# a compile failure falls back to the reference with a RuntimeWarning: here it must fail
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
from mpcompile.rounding import get_quantize_kernel


both = functools.partial(reference_and, "fused")


def assert_bitwise(ref, got):
    same = (ref == got) & (torch.signbit(ref) == torch.signbit(got)) | (ref.isnan() & got.isnan())
    assert same.all(), f"{(~same).sum()} mismatches, first at {(~same).nonzero()[:3].tolist()}"


def hard_data(n=1 << 14, seed=0):
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.empty(n).uniform_(-150, 128, generator=g))
    x = torch.where(torch.rand(n, generator=g) < 0.5, -mag, mag)
    x[:6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 448.0])
    return x


@pytest.mark.parametrize("fmt,rounding,saturate", [
    ("fp8_e4m3", "nearest", False), ("fp8_e5m2", "up", True), ("bf16", "odd", False),
    ("e8m0", "nearest", False), ("fixed(8,4)", "down", True), ("mxfp4_e2m1", "nearest_away", False),
])
def test_fused_equals_reference(fmt, rounding, saturate):
    x = hard_data()
    assert_bitwise(*both(x, fmt, rounding, saturate=saturate))


def test_fused_non_contiguous_input():
    x = hard_data(64 * 48).reshape(64, 48).t()
    assert_bitwise(*both(x, "fp8_e4m3", "up"))
    assert_bitwise(*both(x, "fp8_e5m2", "stochastic", seed=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_blocks_across_an_inner_axis(dtype):
    x = hard_data(66 * 64).reshape(66, 64).to(dtype)
    assert_bitwise(*both(x, MXFormat(get("fp6_e2m3"), 16, axis=0), "up"))


def test_fused_stochastic_equals_reference_given_bits():
    x = hard_data()
    bits = torch.randint(0, 2**20, x.shape, generator=torch.Generator().manual_seed(1))
    assert_bitwise(*both(x, "fp8_e4m3", "stochastic", sr_bits=20, random_bits=bits))
    # seeded counter bits: the same on both backends (70,000 values: eager works in chunks)
    ref, got = both(hard_data(70_000), "fp8_e4m3", "stochastic", seed=5)
    assert_bitwise(ref, got)


def test_one_inductor_kernel_per_family_not_per_shape_or_format():
    before = fused_cpu.compiled_kernels()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recompile-limit fallback would warn
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's own, from inside inductor (torch 2.11)
        for n, fmt in [(1000, "fp8_e5m2"), (3000, "fp16"), (777, "e4m3")]:  # IEEE-style family, nearest
            assert_bitwise(*both(torch.randn(n, dtype=torch.float64), fmt))  # float64: inductor's, not C++
    assert fused_cpu.compiled_kernels() - before <= 1


def test_auto_picks_fused_for_cpu_tensors(monkeypatch):
    from mpcompile.rounding import _select, plan_quantize

    monkeypatch.setattr(fused_cpu, "MIN_NUMEL", 100)
    single, _ = plan_quantize(parse("mxfp8_e4m3"), "nearest", False, torch.float32, 20)  # C++, any size
    double, _ = plan_quantize(parse("fp8_e4m3"), "nearest", False, torch.float64, 20)  # inductor from 100
    assert _select(torch.zeros(1), single).name == "fused"
    assert _select(torch.zeros(99, dtype=torch.float64), double).name == "reference"
    assert _select(torch.zeros(100, dtype=torch.float64), double).name == "fused"
    set_quantize_kernel("reference")
    try:
        assert _select(torch.zeros(100), single).name == "reference"
    finally:
        set_quantize_kernel(None)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # dynamo traces the reference
    assert _select(torch.zeros(1000), single).name == "reference"


def test_kernel_switch_env_and_errors(monkeypatch):
    monkeypatch.setenv("MPCOMPILE_QUANTIZE_KERNEL", "reference")
    assert get_quantize_kernel() == "reference"
    monkeypatch.setenv("MPCOMPILE_QUANTIZE_KERNEL", "nonsense")
    with pytest.raises(ValueError, match="MPCOMPILE_QUANTIZE_KERNEL"):
        quantize(torch.ones(3), "fp16")
    with pytest.raises(ValueError, match="unknown quantize kernel"):
        set_quantize_kernel("gpu9000")


def test_the_old_backend_spellings_warn_and_still_work(monkeypatch):
    import mpcompile
    from mpcompile.rounding import get_quantize_backend, register_backend, reference_quantize

    with pytest.warns(DeprecationWarning, match="set_quantize_kernel"):
        mpcompile.set_quantize_backend("reference")
    try:
        with pytest.warns(DeprecationWarning, match="get_quantize_kernel"):
            assert get_quantize_backend() == "reference"
    finally:
        set_quantize_kernel(None)
    monkeypatch.setenv("MPCOMPILE_QUANTIZE_BACKEND", "fused")
    with pytest.warns(DeprecationWarning, match="MPCOMPILE_QUANTIZE_KERNEL"):
        assert get_quantize_kernel() == "fused"
    monkeypatch.setenv("MPCOMPILE_QUANTIZE_KERNEL", "reference")  # the new name wins
    assert get_quantize_kernel() == "reference"
    monkeypatch.delenv("MPCOMPILE_QUANTIZE_BACKEND")
    monkeypatch.delenv("MPCOMPILE_QUANTIZE_KERNEL")
    from mpcompile import rounding

    monkeypatch.setattr(rounding, "_KERNELS", dict(rounding._KERNELS))  # the registration is undone after
    with pytest.warns(DeprecationWarning, match="register_quantize_kernel"):
        register_backend("mine", reference_quantize, lambda x, plan: False)
    set_quantize_kernel("mine")
    set_quantize_kernel(None)


@pytest.mark.filterwarnings("default::RuntimeWarning")
@pytest.mark.parametrize("dtype,kernel", [(torch.float64, "inductor"), (torch.float32, "C++")], ids=str)
def test_compile_failure_falls_back_with_warning(monkeypatch, dtype, kernel):
    def broken(*args, **kw):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(quantize_cpu, "compile_library", broken)
    monkeypatch.setattr(quantize_cpu, "_LIBRARIES", {})
    monkeypatch.setattr(fused_cpu, "_KERNELS", {})
    monkeypatch.setattr(fused_cpu, "_FAILED", set())
    x = hard_data(256).to(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref, got = both(x, "fp6_e3m2", "toward_zero", saturate=True)
    assert_bitwise(ref, got)
    assert any(f"the {kernel} quantize kernel" in str(w.message) and "failed to compile" in str(w.message)
               for w in caught)
