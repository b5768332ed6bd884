"""The Triton GEMM against the reference emulation, bit for bit, in Triton's interpreter (or on CUDA)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from backend_pairs import DEVICE, NO_TRITON, TRITON_RUNS

if not TRITON_RUNS:
    pytest.skip(NO_TRITON, allow_module_level=True)

from mpcompile.codegen.triton_gemm import SupportError, supports, triton_matmul  # noqa: E402
from mpcompile.ops.emulate import emulated_matmul  # noqa: E402
from mpcompile.ops.roles import quantize_role  # noqa: E402
from mpcompile.ops.spec import parse_arith, parse_quant  # noqa: E402


def _reference(a, b, arith, a_role, b_role, seed_a=0, seed_b=0, b_transposed=False, seed=None, index=None):
    aq = quantize_role(a, a_role, axis=-1, seed=seed_a)
    w = b.transpose(-1, -2) if b_transposed else b  # the role tensor as quantize_role sees it
    bq = quantize_role(w.contiguous(), b_role, axis=0, seed=seed_b)
    bq = bq.transpose(-1, -2) if b_transposed else bq
    return emulated_matmul(aq, bq, arith, exact_products=True, seed=seed, index=index).float()


def _same(x, y):
    """Bit for bit, except that a NaN matches any NaN: the sign and payload of a NaN made by an
    addition (inf - inf) are the hardware's, on either side."""
    nan = x.isnan()
    return torch.equal(nan, y.isnan()) and torch.equal(x.view(torch.int32)[~nan], y.view(torch.int32)[~nan])


@pytest.mark.parametrize("acc, role, rounding", [
    ("bf16", "fp8_e4m3", "nearest"), ("e6m9", "fp8_e5m2", "nearest"), ("fp16", "bf16", "toward_zero"),
    ("e5m2", "fp8_e4m3", "up"), ("bf16", "e3m2", "odd"),
])
def test_sequential_equals_the_reference_at_tile_edges(acc, role, rounding):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1, 67, 13, generator=gen) * 3  # 67 and 70: past one 64-wide tile
    b = torch.randn(1, 13, 70, generator=gen)
    a, b = a.to(DEVICE), b.to(DEVICE)
    arith = parse_arith(f"acc={acc} rounding={rounding}")
    r = parse_quant(role)
    assert _same(triton_matmul(a, b, arith, a_role=r, b_role=r), _reference(a, b, arith, r, r))


@pytest.mark.parametrize("order", ["", " order=chunk(16)"])
def test_a_role_without_zero_adds_nothing_past_the_edges(order):
    """E8M0 rounds 0 up to 2**-127; the zeros a tile loads past the matrix must not become that."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(1, 5, 19, generator=gen).abs().to(DEVICE)
    b = torch.randn(1, 19, 7, generator=gen).abs().to(DEVICE)
    arith, r = parse_arith("acc=e8m15" + order), parse_quant("e8m0")
    assert _same(triton_matmul(a, b, arith, a_role=r, b_role=r), _reference(a, b, arith, r, r))


def test_stochastic_roles_draw_the_bits_of_quantize_role_also_for_a_transposed_weight():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(1, 9, 40, generator=gen)
    w = torch.randn(1, 11, 40, generator=gen).to(DEVICE)  # (N, K), read as its transpose
    a = a.to(DEVICE)
    arith = parse_arith("acc=bf16")
    r = parse_quant("fp8_e4m3:stochastic")
    got = triton_matmul(a, w.transpose(1, 2), arith, a_role=r, b_role=r, seed_a=5, seed_b=9, b_transposed=True)
    want = _reference(a, w.transpose(1, 2), arith, r, r, 5, 9, b_transposed=True)
    assert _same(got, want)
    other = triton_matmul(a, w.transpose(1, 2), arith, a_role=r, b_role=r, seed_a=6, seed_b=9, b_transposed=True)
    assert not _same(got, other)  # the seed reaches the bits


@pytest.mark.parametrize("chunk", [16, 32])
def test_chunked_equals_the_reference_where_the_chunk_sums_are_exact_in_float32(chunk):
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(-8, 9, (2, 35, 100), generator=gen).float()  # products and chunk sums: small integers
    b = torch.randint(-8, 9, (2, 100, 33), generator=gen).float()
    a, b = a.to(DEVICE), b.to(DEVICE)
    arith = parse_arith(f"acc=e5m2 order=chunk({chunk})")
    got = triton_matmul(a, b, arith, a_role=parse_quant("fp8_e4m3"), b_role=parse_quant("fp8_e4m3"))
    assert _same(got, _reference(a, b, arith, parse_quant("fp8_e4m3"), parse_quant("fp8_e4m3")))
    assert not _same(got, a @ b)  # the e5m2 accumulator rounds


@pytest.mark.parametrize("order", ["", " order=chunk(32)"])
def test_a_float32_accumulator_is_float32s_own_add(order):
    """Each chunk (or product) is 2**12 times the last, so the float32 sums round."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randint(-8, 9, (2, 33, 100), generator=gen).float() * 2.0 ** (12 * (torch.arange(100) // 32))
    b = torch.randint(-8, 9, (2, 100, 35), generator=gen).float()
    a, b = a.to(DEVICE), b.to(DEVICE)
    arith, r = parse_arith("acc=fp32" + order), parse_quant("bf16")
    got = triton_matmul(a, b, arith, a_role=r, b_role=r)
    assert _same(got, _reference(a, b, arith, r, r))
    assert not _same(got, (a.double() @ b.double()).float())  # the accumulator rounded


@pytest.mark.parametrize("role", ["fixed(8,4)", "fixed(6,2):stochastic", "fixed(8,8,unsigned)"])
def test_fixed_point_roles_are_rounded_in_the_prologue(role):
    gen = torch.Generator().manual_seed(6)
    a = (torch.randn(1, 21, 30, generator=gen) * 4).to(DEVICE)
    b = torch.randn(1, 30, 18, generator=gen).to(DEVICE)
    arith, r, e = parse_arith("acc=e6m9"), parse_quant(role), parse_quant("fp8_e5m2")
    got = triton_matmul(a, b, arith, a_role=r, b_role=e, seed_a=3)
    assert _same(got, _reference(a, b, arith, r, e, seed_a=3))


def test_overflow_and_nan_follow_the_reference():
    a = torch.tensor([[[60000.0, 60000.0, 1.0], [float("nan"), 1.0, 1.0], [-3.0, 2.5, float("inf")]]], device=DEVICE)
    b = torch.ones(1, 3, 4, device=DEVICE)
    arith, r = parse_arith("acc=fp16"), parse_quant("fp16")
    got = triton_matmul(a, b, arith, a_role=r, b_role=r)
    assert _same(got, _reference(a, b, arith, r, r))
    assert got[0, 0, 0] == float("inf") and got[0, 1, 0].isnan()


@pytest.mark.parametrize("arith", [
    "acc=bf16 rounding=stochastic", "acc=e5m2 rounding=stochastic sr_bits=7 order=chunk(16)",
    "acc=fp16 rounding=stochastic order=chunk(32)", "mul=e5m2 acc=fp16 rounding=stochastic",
    "mul=e4m3 acc=bf16 mul_rounding=stochastic order=chunk(8)",
    "acc=e6m9 rounding=stochastic kahan=true order=chunk(16)",
])
def test_stochastic_products_and_sums_draw_the_references_bits(arith):
    """Rounding step j of stream s of output element i draws counter_words(i, stream_seed(seed,
    s, j)), with i from the op's numbering of its outputs (here a permutation of them)."""
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, 17, 24, generator=gen) * 3, torch.randn(2, 24, 30, generator=gen)
    a, b = a.where(a.abs() > 0.25, 0).to(DEVICE), b.where(b.abs() > 0.25, 0).to(DEVICE)  # exact float32 chunk sums
    index = torch.randperm(2 * 17 * 30, generator=gen).view(2, 17, 30).to(DEVICE)
    arith, r = parse_arith(arith), parse_quant("fp8_e4m3")
    got = triton_matmul(a, b, arith, a_role=r, b_role=r, seed=11, index=index)
    assert _same(got, _reference(a, b, arith, r, r, seed=11, index=index))
    assert not _same(got, triton_matmul(a, b, arith, a_role=r, b_role=r, seed=12, index=index))  # the seed reaches them
    assert not _same(got, triton_matmul(a, b, arith, a_role=r, b_role=r, seed=11))  # and the index


@pytest.mark.parametrize("arith", [
    "mul=e4m3 acc=bf16", "mul=bf16 acc=e5m2 rounding=up order=chunk(4)", "acc=bf16 kahan=true",
    "acc=e5m2 kahan=true rounding=toward_zero order=chunk(8)", "acc=e8m22", "acc=fp32 rounding=down",
    "mul=fp16 acc=fp32 order=chunk(8)",
])
def test_rounded_products_kahan_and_wide_accumulators_equal_the_reference(arith):
    """Rounded products, and chunks under 16, are summed in float64 in k's order (exact here);
    accumulators with 22 or 23 fraction bits round the exact sum through float64, as the
    reference does."""
    gen = torch.Generator().manual_seed(8)
    a = (torch.randn(1, 33, 24, generator=gen) * 2.0 ** (4 * (torch.arange(24) % 5))).to(DEVICE)
    b = torch.randn(1, 24, 40, generator=gen).to(DEVICE)
    arith, r = parse_arith(arith), parse_quant("bf16")
    got = triton_matmul(a, b, arith, a_role=r, b_role=r)
    assert _same(got, _reference(a, b, arith, r, r))


@pytest.mark.parametrize("scale, arith", [
    (2.0**-80, "acc=bf16 rounding=up"), (2.0**-80, "acc=bf16 order=chunk(16) rounding=up"),
    (2.0**66, "acc=bf16"), (2.0**66, "acc=e8m10 order=chunk(16)"),
])
def test_products_beyond_float32s_range_are_formed_in_float64(scale, arith):
    """bf16 x bf16 products can leave float32's range: 2**-160 rounds up to bf16's least value,
    not 0; 2**132 is no float32, and a chunk of them that cancels in pairs sums to 0, not NaN."""
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(1, 20, 32, generator=gen) * scale
    b = torch.randn(1, 32, 18, generator=gen) * scale
    if scale > 1:
        a[..., 1::2], b[:, 1::2] = a[..., 0::2], -b[:, 0::2]
    arith, r = parse_arith(arith), parse_quant("bf16")
    got = triton_matmul(a.to(DEVICE), b.to(DEVICE), arith, a_role=r, b_role=r)
    want = _reference(a.to(DEVICE), b.to(DEVICE), arith, r, r)
    assert _same(got, want) and not torch.isnan(want).any()


def test_what_it_does_not_emulate_is_refused():
    r = parse_quant("bf16")
    assert not supports(parse_arith("acc=bf16 order=pairwise"), r, r)
    assert not supports(parse_arith("acc=e10m10"), r, r)  # an accumulator beyond float32's range
    assert not supports(parse_arith("mul=e10m10 acc=bf16"), r, r)  # bf16 products are rounded from float64
    assert supports(parse_arith("mul=e10m10 acc=bf16"), parse_quant("fp8_e4m3"), parse_quant("fp8_e4m3"))
    assert supports(parse_arith("acc=fp32 rounding=toward_zero kahan=true"), r, r)
    assert supports(parse_arith("acc=bf16 rounding=stochastic"), None, None)  # fp32 operands: float64 products
    with pytest.raises(SupportError, match="pairwise"):
        triton_matmul(torch.ones(1, 2, 2, device=DEVICE), torch.ones(1, 2, 2, device=DEVICE),
                      parse_arith("acc=bf16 order=pairwise"))
    with pytest.raises(ValueError, match="needs a seed"):
        triton_matmul(torch.ones(1, 2, 2, device=DEVICE), torch.ones(1, 2, 2, device=DEVICE),
                      parse_arith("acc=bf16 rounding=stochastic"))


def test_operands_rounded_beforehand_may_carry_power_of_two_scales():
    """MX blocks and tensor scaling keep an element's significand, so products stay exact; the
    roles then only vouch for that (quantize=False), as the ops use the kernel."""
    from mpcompile import quantize

    gen = torch.Generator().manual_seed(3)
    a = quantize(torch.randn(1, 20, 64, generator=gen).to(DEVICE), "mxfp8_e4m3")
    b = quantize(torch.randn(1, 64, 24, generator=gen).to(DEVICE) * 100, "mxfp8_e5m2")
    arith = parse_arith("acc=bf16")
    got = triton_matmul(a, b, arith, a_role=parse_quant("mxfp8_e4m3"), b_role=parse_quant("mxfp8_e5m2"),
                        quantize=False)
    assert _same(got, emulated_matmul(a, b, arith, exact_products=True).float())
    assert supports(arith, parse_quant("fp8_e4m3:tensor"), parse_quant("fp8_e4m3:channel"), quantize=False)
    assert not supports(arith, parse_quant("fp8_e4m3:tensor"), parse_quant("fp8_e4m3"))  # not in the prologue
    amax = parse_quant("fp8_e4m3:tensor_amax")  # any float32 values: float64 products
    assert supports(arith, amax, parse_quant("fp8_e4m3"), quantize=False)
    a = quantize_role(torch.randn(1, 20, 64, generator=gen).to(DEVICE), amax, axis=-1, seed=0)
    got = triton_matmul(a, b, arith, a_role=amax, b_role=parse_quant("mxfp8_e5m2"), quantize=False)
    assert _same(got, emulated_matmul(a, b, arith, exact_products=True).float())


def test_fp8_chunks_go_through_fp16_dots_with_fp32_sums():
    """FP8 operands enter tl.dot as fp16 (tensor cores on a GPU); the slab's sum must still be
    fp32's: 31 x 32 + 0.125 = 992.125 needs 13 significant bits, fp16 holds 11."""
    a = torch.full((1, 16, 32), 32.0, device=DEVICE)
    a[..., -1] = 0.125
    b = torch.ones(1, 32, 16, device=DEVICE)
    arith, r = parse_arith("acc=e8m15 order=chunk(32)"), parse_quant("fp8_e4m3")
    got = triton_matmul(a, b, arith, a_role=r, b_role=r)
    assert torch.all(got == 992.125) and _same(got, _reference(a, b, arith, r, r))


_COMPILE_GEMMS_FOR_SM90 = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from mpcompile.codegen import triton_gemm as tg, triton_quantize
    from mpcompile.ops.spec import parse_arith, parse_quant
    assert not triton_quantize.INTERPRETED
    kernel, tiles, launches = tg._gemm_kernel, tg._tiles, []

    class Record:  # stands in for the kernel: keeps what triton_matmul would launch
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((args, kw))

    tg._gemm_kernel, tg._tiles = Record(), lambda sums, device_type: tiles(sums, "cuda")
    gen = torch.Generator().manual_seed(0)
    for arith, ra, rb, kw in CASES:
        quant = lambda r: r if r is None else parse_quant(r)
        kw = {k: quant(v) if k == "out_role" else v for k, v in kw.items()}
        if "bias" in kw:
            kw["bias"] = torch.randn(8, generator=gen)
        if "index" in kw:  # the output's numbering, as conv's
            kw["index"] = torch.randperm(64, generator=gen).view(1, 8, 8)
        a, b = torch.randn(1, 8, 40, generator=gen), torch.randn(1, 40, 8, generator=gen)
        tg.triton_matmul(a, b, parse_arith(arith), a_role=quant(ra), b_role=quant(rb), **kw)
    assert len(launches) == len(CASES)
    for (args, kw), case in zip(launches, CASES):
        types = {torch.float32: "*fp32", torch.int64: "*i64"}
        sig = {n: types[v.dtype] if isinstance(v, torch.Tensor) else "i32" for n, v in zip(kernel.arg_names, args)}
        options = {k: kw.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion")}
        source = triton.compiler.ASTSource(kernel, {**sig, **{k: "constexpr" for k in kw}}, kw)
        try:
            triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        except Exception as err:
            while err.__cause__ is not None:
                err = err.__cause__
            raise SystemExit(f"{case}: {type(err).__name__}: {err}")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA every other test compiles the kernels")
def test_kernels_compile_for_a_gpu():
    """The interpreter runs Python, not the compiler, and takes code the compiler refuses (an
    early return's type, a branch its constexprs rule out): compile the kernels triton_matmul
    would launch on an sm_90 GPU, over every constexpr branch, where the interpreter is off."""
    cases = [  # (arithmetic, a's role, b's role, triton_matmul's keywords)
        ("acc=bf16 order=chunk(32)", "fp8_e4m3", "fp8_e4m3", {"bias": True, "out_role": "fp8_e4m3"}),  # fp16 dots
        ("acc=fp32 order=chunk(32)", "bf16", "bf16", {}),  # float32's own add, ieee dots
        ("acc=e5m10", "fp8_e5m2", "fp8_e5m2", {}),
        ("acc=bf16 rounding=stochastic", "fp8_e4m3:stochastic", "fp8_e4m3", {
            "seed": 1, "index": True, "out_role": "bf16:stochastic", "seed_out": 2}),
        ("acc=fp16 order=chunk(8) kahan=true", None, None, {}),  # float64 products and chunk sums
        ("acc=e8m22 order=chunk(32) rounding=up", "fp16", "fp16", {"bias": True}),  # float64 adds of dots
        ("acc=bf16 mul=bf16 mul_rounding=stochastic order=chunk(16)", None, None, {"seed": 3}),
        ("acc=fp16 mul=e5m10 rounding=stochastic kahan=true", "fixed(8,4)", "fixed(8,4)", {"seed": 4}),
        ("acc=e6m9 order=chunk(64) rounding=odd", "bf16", "e8m0", {"quantize": (False, True)}),
    ]
    script = f"CASES = {cases!r}\n" + _COMPILE_GEMMS_FOR_SM90
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
