"""The Triton quantize backend is bit-identical to the reference; registration, caching and fallback work.

Every case runs ``quantize`` once per backend on the hard inputs of the rounding tests
(``oracles.inputs``-style grids: format values and their neighbours, midpoints, the subnormal
range, the overflow edge, +-0, +-inf and NaN; ``fixed_inputs``; ``block_data``) and compares
the float32 bit patterns with ``torch.equal``. NaNs are compared as NaN: the reference's NaN
payload and sign depend on which torch kernel produced it (``torch.maximum``'s vectorised
path returns 0xFFFFFFFF, its scalar tail the operand), so they are not part of the semantics.

Runs in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, which conftest sets) or on
CUDA; one test also compiles the kernels for an sm_90 GPU, which needs no GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (a dependency on Linux only)")
import triton.language as tl

from mpcompile import quantize, set_quantize_kernel
from mpcompile.backends import BackendError
from mpcompile.codegen import triton_quantize as tq
from mpcompile.codegen.triton_round import counter_word
from mpcompile.formats import BlockFloat, BlockMinifloat, FixedFormat, FloatFormat, MXFormat, get, p3109
from mpcompile.random_bits import counter_words
from mpcompile.rounding import _select, plan_quantize
from backend_pairs import DEVICE, NO_TRITON, TRITON_RUNS, reference_and
from oracles import assert_bitwise, block_data, fid, fixed_inputs, float_inputs

if not TRITON_RUNS:
    pytest.skip(NO_TRITON, allow_module_level=True)

# a fallback to the reference warns: here it would hide a kernel that does not work
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
MODES = ["nearest", "nearest_away", "toward_zero", "up", "down", "odd"]

FLOATS = [
    get("fp8_e4m3"), get("fp8_e5m2"), FloatFormat(4, 3, bias=11, inf=False, nan="none"), get("bf16"), get("fp16"),
    get("fp4_e2m1"), get("e8m0"),
    FloatFormat(4, 4, signed=False),                      # unsigned
    FloatFormat(3, 2, subnormals=False),                  # no subnormals (flush to zero), with inf
    p3109(8, 3),                                          # NaN in the -0 code, no -0
    FloatFormat(3, 0),                                    # man == 0 with zero: the parity rule
    FloatFormat(8, 3, bias=150),                          # a grid finer than float32's subnormals
    FloatFormat(5, 2, bias=-20),                          # quantum > 1: tiny inputs far below it
]
FIXED = [FixedFormat(8, 4), FixedFormat(8, 4, signed=False), FixedFormat(6, -3), FixedFormat(8, 140)]
BLOCKS = [get("mxfp8_e4m3"), get("mxfp4_e2m1"), get("mxint8"), BlockFloat(8, 16), BlockMinifloat(4, 3, 16),
          BlockMinifloat(2, 5, 24)]  # 24: a block narrower than its power-of-two tile


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns, every NaN as torch.nan's."""
    t = torch.where(t.isnan(), torch.full_like(t, torch.nan), t)
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def assert_same(x: torch.Tensor, fmt, rounding: str = "nearest", seed: int | None = None, **kw) -> None:
    ref, got = reference_and("triton", x, fmt, rounding, seed, **kw)
    if not torch.equal(_bits(ref), _bits(got)):
        assert_bitwise(x, got, ref, f"{fmt} {rounding} {kw}")  # names the first mismatches
        raise AssertionError(f"{fmt} {rounding} {kw}: equal values, different bit patterns")


def random_bits(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.randint(0, 2**n, x.shape, generator=torch.Generator().manual_seed(n)).to(x.device)


def blocks_input(fmt, rows: int = 6, extra: int = 5) -> torch.Tensor:
    """(rows, 3 blocks + extra): block_data's hard blocks, a tail block per row, and a NaN, an
    inf, a -inf and an all -0 block."""
    bs = fmt.block_size
    length = 3 * bs + extra
    x = torch.from_numpy(block_data(bs, -(-rows * length // bs), bs)).float()[:rows * length].reshape(rows, length)
    x[0, 1], x[1, bs + 2], x[2, 2 * bs], x[3, :bs] = torch.nan, torch.inf, -torch.inf, -0.0
    return x.to(DEVICE)


# -- elementwise formats --------------------------------------------------------------------------
@pytest.mark.parametrize("sat", [False, True], ids=["nosat", "sat"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("f", FLOATS + FIXED, ids=fid)
def test_elementwise_equals_reference(f, mode, sat):
    x = (fixed_inputs if isinstance(f, FixedFormat) else float_inputs)(f, torch.float32).to(DEVICE)
    assert_same(x, f, mode, saturate=sat)


@pytest.mark.parametrize("f, fast", [
    (get("fp8_e4m3"), True), (get("bf16"), True), (FloatFormat(8, 22), True),  # emin = -126: one shift throughout
    (FloatFormat(8, 3, bias=121), True),    # subnormal quantum 2**-123: the add-and-subtract path
    (FloatFormat(8, 3, bias=123), True),    # quantum 2**-125: the last one it takes
    (FloatFormat(8, 3, bias=124), False),   # quantum 2**-126: float32 subnormals would matter
    (FloatFormat(8, 3, bias=150), False), (FloatFormat(3, 2, subnormals=False), False), (FloatFormat(3, 0), False),
], ids=lambda v: fid(v) if not isinstance(v, bool) else ("fast" if v else "general"))
def test_nearest_even_fast_path_on_every_kind_of_bit_pattern(f, fast):
    """Round-to-nearest-even has a short path (``_nearest_even``) for the common formats; random
    bit patterns over every exponent, and the format's own values and midpoints, match."""
    plan, params = plan_quantize(f, "nearest", False, torch.float32, 1, False, torch.device(DEVICE))
    assert tq.round_spec(plan, params).nearest_even == fast
    words = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=torch.Generator().manual_seed(4), dtype=torch.int64)
    grid = float_inputs(f, torch.float32) if f.bits <= 16 else torch.empty(0)  # (only narrow formats enumerate)
    x = torch.cat([words.to(torch.int32).view(torch.float32), grid]).to(DEVICE)
    for sat in (False, True):
        assert_same(x, f, "nearest", saturate=sat)


@pytest.mark.parametrize("f, fast", [
    (get("fp8_e4m3"), True), (get("fp8_e5m2"), True), (get("fp16"), True), (get("fp4_e2m1"), True),
    (get("bf16"), True), (FloatFormat(8, 22), True),            # emin = -126: the carry throughout
    (FloatFormat(4, 4, signed=False), True), (FloatFormat(5, 2, bias=-20), True),  # emin = 21
    (FloatFormat(8, 3, bias=104), True),    # emin = -103: t = a * 2**126 below 2**emin
    (FloatFormat(8, 3, bias=106), False),   # emin = -105: 2**(23 - emin) is past float32's range
    (FloatFormat(8, 3, bias=150), False), (FloatFormat(3, 2, subnormals=False), False), (FloatFormat(3, 0), False),
], ids=lambda v: fid(v) if not isinstance(v, bool) else ("fast" if v else "general"))
def test_stochastic_carry_fast_path_on_every_kind_of_bit_pattern(f, fast):
    """Stochastic rounding with the default 23 - man random bits has a short path
    (``_stochastic_carry``); random bit patterns over every exponent, and the format's own values
    and midpoints, match, with seeded bits and with given ones."""
    plan, params = plan_quantize(f, "stochastic", False, torch.float32, max(1, 23 - f.man), True, torch.device(DEVICE))
    assert tq.round_spec(plan, params).stochastic_carry == fast
    words = torch.randint(-2**31, 2**31 - 1, (100_000,), generator=torch.Generator().manual_seed(5), dtype=torch.int64)
    grid = float_inputs(f, torch.float32) if f.bits <= 16 else torch.empty(0)
    x = torch.cat([words.to(torch.int32).view(torch.float32), grid]).to(DEVICE)
    for sat in (False, True):
        assert_same(x, f, "stochastic", seed=sat + 1, saturate=sat)
    n = max(1, 23 - f.man)
    # all-ones bits round away whenever the dropped fraction, rounded to n bits, is not 0; zeros
    # only where it rounds up to 1: both hinge on that rounding, which random bits rarely reach
    ones, zeros = torch.full_like(x, 2**n - 1, dtype=torch.int64), torch.zeros_like(x, dtype=torch.int64)
    for bits in (random_bits(x, n), ones, zeros):
        assert_same(x, f, "stochastic", sr_bits=n, random_bits=bits)


@pytest.mark.parametrize("f", FLOATS + FIXED, ids=fid)
def test_stochastic_seeded_equals_reference(f):
    """The kernel recomputes counter_bits from each element's index: the same words, no tensor of them."""
    x = (fixed_inputs if isinstance(f, FixedFormat) else float_inputs)(f, torch.float32).to(DEVICE)
    assert_same(x, f, "stochastic", seed=11)


@pytest.mark.parametrize("n", [1, 13, 24, 30, 62], ids=lambda n: f"sr{n}")
@pytest.mark.parametrize("f", [get("fp8_e4m3"), get("bf16"), get("e8m0"), FixedFormat(8, 4), FixedFormat(6, -3)], ids=fid)
def test_stochastic_given_bits_equals_reference(f, n):
    """Explicit bits; past 24 bits the reference takes its integer path, past 32 no seed can serve."""
    x = (fixed_inputs if isinstance(f, FixedFormat) else float_inputs)(f, torch.float32).to(DEVICE)
    bits = random_bits(x, n) | (1 << n)  # bits above sr_bits are ignored
    assert_same(x, f, "stochastic", sr_bits=n, random_bits=bits)


def test_shapes_off_the_tile_and_non_contiguous():
    x = float_inputs(get("fp8_e4m3"), torch.float32).to(DEVICE)
    x = torch.cat([x, x.flip(0)])
    for n in (1, 7, tq.ELEMENTS_PER_PROGRAM - 1, tq.ELEMENTS_PER_PROGRAM + 1):
        assert len(x) > n
        assert_same(x[:n], "fp8_e4m3", "nearest")
    cols = x[: 37 * 41].reshape(37, 41).t()
    assert_same(cols, "fp8_e5m2", "up")
    assert_same(cols, "fp8_e5m2", "stochastic", seed=3)
    assert_same(x[:0], "fp8_e4m3")


def test_counter_word_equals_counter_words_beyond_32_bit_indices():
    @triton.jit
    def words(index_ptr, seed_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        w = counter_word(tl.load(index_ptr + offs, mask=mask), tl.load(seed_ptr).to(tl.uint32))
        tl.store(out_ptr + offs, w.to(tl.int64), mask=mask)

    index = torch.tensor([0, 1, 2, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 3, 2**40 + 7, 2**62 + 5],
                         device=DEVICE)
    for seed in (0, 1, 0xDEADBEEF, 2**32 - 1):
        s = torch.tensor(seed, device=DEVICE)
        out = torch.empty_like(index)
        words[(1,)](index, s, out, len(index), BLOCK=16)
        assert torch.equal(out, counter_words(index, s)), seed


# -- block formats --------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [5, 0], ids=["tail", "whole blocks"])  # 0: one run of blocks, no division
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("f", BLOCKS, ids=fid)
def test_blocks_equal_reference(f, mode, extra):
    assert_same(blocks_input(f, extra=extra), f, mode)


@pytest.mark.parametrize("extra", [5, 0], ids=["tail", "whole blocks"])
@pytest.mark.parametrize("f", [get("mxfp8_e4m3"), get("mxfp8_e5m2"), get("mxfp4_e2m1"), BlockMinifloat(4, 3, 16),
                               MXFormat(FloatFormat(5, 10), 24)], ids=fid)
def test_blocks_round_to_nearest_on_the_short_path_where_a_tile_allows_it(f, extra):
    """Where every block of a tile has its scaled grid inside float32's normal range (realistic
    data), blocks round to nearest through ``_nearest_even`` at their scale; a tile holding one
    extreme block (amax near float32's least value, or inf) takes the general path. Blocks
    centred on binades -100..100, elements spread over 0-40 binades below (down into the
    scaled subnormals), ties, and all-zero blocks."""
    gen = torch.Generator().manual_seed(6)
    bs = f.block_size
    rows, length = 3 * tq.ELEMENTS_PER_PROGRAM // (4 * bs), 4 * bs + extra
    n = rows * length
    centre = torch.randint(-100, 100, (n // bs + 1, 1), generator=gen).expand(-1, bs).flatten()[:n]
    spread = torch.randint(0, 41, (n,), generator=gen) * (torch.rand(n, generator=gen) < 0.3)
    x = torch.ldexp(1 + torch.rand(n, generator=gen), centre - spread) * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
    ties = torch.ldexp(torch.randint(-40, 41, (n,), generator=gen).float(), centre)
    x = torch.where((centre % 4) == 0, ties, x)
    x[(centre % 7) == 0] = 0.0
    x = x.reshape(rows, length)
    x[-1, :bs] = torch.ldexp(torch.ones(bs), torch.tensor(-135))  # in the last tile only
    x[rows // 2, 1] = torch.inf  # in a middle tile only
    assert_same(x.to(DEVICE), f, "nearest")


@pytest.mark.parametrize("f", BLOCKS, ids=fid)
def test_blocks_stochastic_equal_reference(f):
    x = blocks_input(f)
    assert_same(x, f, "stochastic", seed=5)
    assert_same(x, f, "stochastic", sr_bits=40, random_bits=random_bits(x, 40))


@pytest.mark.parametrize("axis", [0, 1])
def test_blocks_along_an_inner_axis(axis):
    """Blocks along axis 0 of a matrix and axis 1 of a 3-d tensor (with a tail), non-contiguous
    input; the kernel reads them in place, and seeded bits follow x's own element order."""
    x = blocks_input(get("mxfp8_e4m3"), rows=4, extra=3)
    x = x.t() if axis == 0 else x.reshape(2, 2, 99).transpose(1, 2)
    for f in (MXFormat(get("fp8_e4m3"), 32, axis=axis), BlockFloat(8, 16, axis=axis)):
        assert_same(x, f, "nearest")
        assert_same(x, f, "down")
        assert_same(x, f, "stochastic", seed=8)


# -- backend plumbing -----------------------------------------------------------------------------
def test_one_launcher_per_plan_and_format_not_per_shape():
    f = FloatFormat(5, 4)  # a format no other test uses
    before = tq.cached_launchers()
    for n in (100, 3000, 5):
        assert_same(torch.linspace(-3, 3, n, device=DEVICE), f)
    assert tq.cached_launchers() - before == 1
    assert_same(torch.linspace(-3, 3, 50, device=DEVICE), FloatFormat(5, 5))  # same plan, other numbers
    assert tq.cached_launchers() - before == 2


def test_float64_plans_run_the_reference():
    x = float_inputs(get("fp8_e4m3"), torch.float64).to(DEVICE)
    before = tq.cached_launchers()
    assert_same(x, "fp8_e4m3", "up")
    assert tq.cached_launchers() == before


@pytest.mark.filterwarnings("default::RuntimeWarning")
def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    real = tq.round_spec
    monkeypatch.setattr(tq, "round_spec", lambda plan, params: real(plan, params)._replace(rounding="no such mode"))
    monkeypatch.setattr(tq, "_LAUNCHERS", {})
    monkeypatch.setattr(tq, "_FAILED", set())
    x = float_inputs(get("fp6_e3m2"), torch.float32).to(DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert_same(x, "fp6_e3m2", "toward_zero", saturate=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "failed to compile" in messages[0] and "man=2" in messages[0] and "rounding='toward_zero'" in messages[0]


def test_cpu_tensor_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(tq, "INTERPRETED", False)
    set_quantize_kernel("triton")
    try:
        with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
            quantize(torch.ones(4), "fp8_e4m3")
    finally:
        set_quantize_kernel(None)


def test_auto_picks_triton_for_cuda_float32_only():
    plan32, _ = plan_quantize(get("fp8_e4m3"), "nearest", False, torch.float32, 20)
    plan64, _ = plan_quantize(get("fp8_e4m3"), "nearest", False, torch.float64, 20)
    cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"), numel=lambda: 1 << 30)
    assert tq._accepts(cuda, plan32) and not tq._accepts(cuda, plan64) and not tq._accepts(torch.zeros(8), plan32)
    assert _select(cuda, plan32).name == "triton"
    assert _select(cuda, plan64).name == "reference"
    assert _select(torch.zeros(8), plan32).name == "fused"  # the C++ kernel, not Triton's interpreter


_COMPILE_FOR_SM90 = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from mpcompile.codegen import triton_quantize as tq
    from mpcompile.codegen.round_spec import round_spec
    from mpcompile.formats import parse
    from mpcompile.rounding import plan_quantize
    assert not tq.INTERPRETED
    ptrs = {"x_ptr": "*fp32", "out_ptr": "*fp32", "bits_ptr": "*i64"}
    for name, mode, seeded in [("fp8_e4m3", "nearest", False), ("e8m0", "odd", False), ("fixed(8,4,unsigned)", "down", False),
                               ("bf16", "stochastic", True), ("fp8_e5m2", "stochastic", False),
                               ("mxfp4_e2m1", "stochastic", True), ("bfp(8,16)", "up", False),
                               ("mxfp8_e4m3", "nearest", False), ("bm(4,3,16)", "nearest", False)]:
        plan, params = plan_quantize(parse(name), mode, False, torch.float32, 20, seeded)
        consts = {"SPEC": round_spec(plan, params), "BITS": "seeded" if seeded else "tensor" if mode == "stochastic" else "none"}
        if plan.block_size is None:
            kernel, ints, consts["BLOCK"] = tq._quantize_values, ["numel"], 1024
        else:
            kernel, ints = tq._quantize_blocks, ["n_blocks", "length", "inner", "blocks_per_line"]
            consts.update(BLOCK_SIZE=plan.block_size, WIDTH=32, ROWS=32, RUN=name.startswith("mx"))
        sig = {**ptrs, **{k: "i64" for k in ints}, **{k: "constexpr" for k in consts}}
        triton.compile(triton.compiler.ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32))
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA every other test compiles the kernels")
def test_kernels_compile_for_a_gpu():
    """The interpreter runs Python, not the compiler: compile a spread of kernels to sm_90 code
    (no GPU needed) in a process where the interpreter is off."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
