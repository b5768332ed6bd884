"""The chunk fold's CPU kernel is ``ops.exact``'s fold bit for bit: ``round_exact(two_sum(acc,
P_j), nearest)`` chunk after chunk, on accumulator formats with and without infinities, -0 and
NaN codes; it counts the adds where a zero chunk sum meets a -0 accumulator. Its GEMM of rounded
products equals torch's chunk-sum path (``ops.emulate``) and the reference dot product, also
where products are rounded and chunks summed in float32 or as int32 counts: on the products whose
float32 value hides their rounding (ties, binade edges, overflow), chunks over the products' whole
range and partial sums up to the int32 bound."""
from __future__ import annotations

import math

import pytest
import torch

from mpcompile.codegen.chunk_fold_cpu import (chunk_products_, float32_sums, fold_chunks_, integer_sums,
                                              offset_gemm_, rounds_in_float32, takes_grid)
from mpcompile.formats import parse
from mpcompile.ops import emulate, reference
from mpcompile.ops.spec import parse_arith
from mpcompile.ops.exact import grid_of, round_exact, two_sum

FORMATS = ["e6m9", "fp16", "bf16", "fp8_e5m2", "fp8_e4m3", "fp8_e4m3fnuz"]


def _torch_fold(acc: torch.Tensor, partials: torch.Tensor, grid) -> torch.Tensor:
    for j in range(partials.shape[1]):
        s, e = two_sum(acc, partials[:, j])
        acc = round_exact(s, e, grid, "nearest")
    return acc


def _hard_partials(batches: int, chunks: int, n: int, fmt, seed: int = 0) -> torch.Tensor:
    """Sums over many binades around the format's range (so that two_sum leaves an error and
    some sums overflow or land in the subnormals), exact midpoints with and without an error
    behind them, zeros of both signs, infinities and NaN."""
    g = torch.Generator().manual_seed(seed)
    span = fmt.emax - fmt.emin + 2 * fmt.man + 8
    exponents = torch.randint(fmt.emin - fmt.man - 4, fmt.emax + 2, (batches, chunks, n), generator=g)
    p = torch.randn(batches, chunks, n, generator=g, dtype=torch.float64) * torch.exp2(exponents.double())
    tiny = torch.exp2(torch.randint(-span, 0, (batches, chunks, n), generator=g).double())
    p = torch.where(torch.rand(batches, chunks, n, generator=g) < 0.2, p + tiny * p, p)
    half_ulp = 2.0 ** -(fmt.man + 1)  # of 1: 1 + half_ulp (1 +- 2**-52) is a float64 midpoint plus an error
    p[:, :, :3] = 0.0
    p[:, 0, :3] = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    p[:, 1, :3] = torch.tensor([half_ulp * (1 + 2.0**-52), half_ulp * (1 - 2.0**-52), -half_ulp * (1 + 2.0**-52)],
                               dtype=torch.float64)
    p[:, :, 3] = torch.where(torch.arange(chunks) % 2 == 0, -0.0, 0.0)
    p[:, 1, 4:8] = torch.tensor([float("inf"), -float("inf"), float("nan"), fmt.max * 2])
    return p


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_fold_is_round_exact_of_two_sum_chunk_after_chunk(name, threads):
    fmt = parse(name)
    grid = grid_of(fmt, "nearest", 0)
    assert takes_grid(grid)
    batches, chunks, n = 2, 5, 8 * 300 + 5  # lanes of eight and a short tail, tiles across batches
    partials = _hard_partials(batches, chunks, n, fmt, seed=len(name))
    acc = torch.zeros(batches, n, dtype=torch.float64)
    expected = _torch_fold(acc.reshape(-1).clone(), partials.transpose(0, 1).reshape(chunks, -1).t(), grid)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fold_chunks_(acc, partials.contiguous(), grid)
    finally:
        torch.set_num_threads(previous)
    got, want = acc.reshape(-1), expected
    assert torch.equal(got.isnan(), want.isnan())
    same = (got.view(torch.int64) == want.view(torch.int64)) | want.isnan()
    assert bool(same.all()), f"{int((~same).sum())} of {got.numel()} differ, e.g. {got[~same][:3]} vs {want[~same][:3]}"


def test_zero_sums_on_a_negative_zero_accumulator_are_counted():
    grid = grid_of(parse("fp16"), "nearest", 0)
    acc = torch.tensor([[-0.0, -0.0, 0.0, -1.0, -0.0]], dtype=torch.float64)
    partials = torch.tensor([[[0.0, -0.0, 0.0, 0.0, 2.0**-30]]], dtype=torch.float64)
    expected = _torch_fold(acc[0].clone(), partials[0].t(), grid)
    assert fold_chunks_(acc, partials, grid) == 2  # the first two: a -0 acc meets a zero sum
    assert torch.equal(acc[0].view(torch.int64), expected.view(torch.int64))


def test_formats_the_kernel_does_not_round_to_are_refused():
    grid = grid_of(parse("e3m2(subnormals=false)"), "nearest", 0)
    assert not takes_grid(grid)
    with pytest.raises(ValueError, match="reference rounding"):
        fold_chunks_(torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 2, 4, dtype=torch.float64), grid)


def _products_operands(B: int, M: int, K: int, N: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 operands over many binades: products that overflow the product format or fall in
    its subnormals, exact midpoints, zeros of both signs, an inf and a NaN."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, M, K, generator=g) * torch.exp2(torch.randint(-14, 9, (B, M, K), generator=g).float())
    b = torch.randn(B, K, N, generator=g) * torch.exp2(torch.randint(-14, 9, (B, K, N), generator=g).float())
    a[0, 0, :4] = torch.tensor([0.0, -0.0, 1.0, 1.0 + 2.0**-3])  # 1 + 2**-3 times 1: e5m2's midpoint
    b[0, :4, :2] = torch.tensor([[-1.0, 0.0], [2.0, -0.0], [1.0, 3.0], [1.0, 1.0]])
    a[-1, 1, 2], b[-1, 3, 1] = float("inf"), float("nan")
    return a, b


@pytest.mark.parametrize("spec", ["mul=fp8_e5m2 acc=e5m10 order=chunk(32)", "mul=fp8_e5m2 acc=fp16 order=chunk(5)",
                                  "mul=fp16 acc=e6m9 order=chunk(16)", "mul=fp8_e4m3 acc=fp8_e5m2 order=chunk(3)",
                                  "mul=fp8_e5m2 acc=e5m10", "acc=fp16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemms_of_rounded_products_equal_torch_and_the_reference(monkeypatch, spec, threads):
    spec = parse_arith(spec)
    k = spec.chunk or 1
    a, b = _products_operands(2, 3, 3 * k + 3 if spec.chunk else 40, 16 * 2 + 13, seed=k)  # a short last chunk,
    plan = emulate._plan(spec, False)  # and columns past the lanes
    got = torch.zeros(2, 3, b.shape[-1], dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        chunk_products_(got, a, b, k, plan.mul, plan.acc, plan.exact_sums, not emulate._chunks_reduce(spec))
    finally:
        torch.set_num_threads(previous)
    monkeypatch.setattr(emulate, "_products_kernel", lambda plan, dtype, device: None)
    torch_path = emulate.emulated_matmul(a, b, spec)
    assert torch.equal(got.isnan(), torch_path.isnan()) and (got.isinf() | got.isnan()).any()  # overflows
    same = (got.view(torch.int64) == torch_path.view(torch.int64)) | got.isnan()  # zeros' signs included
    assert bool(same.all()), f"{int((~same).sum())} differ from torch's path"
    for i in range(2):  # the reference dot product, element by element
        want = torch.tensor([[reference.dot(a[i, m].tolist(), b[i, :, n].tolist(), spec) for n in range(b.shape[-1])]
                             for m in range(3)], dtype=torch.float64)
        assert bool(((got[i] == want) | (got[i].isnan() & want.isnan())).all())


@pytest.mark.parametrize("spec", ["acc=e5m10", "acc=e5m10 order=chunk(2)", "mul=fp16 acc=e5m10"])
@pytest.mark.parametrize("n", [8, 11])  # the exact kernel's rows of 8 columns, the general tiles
def test_a_negative_zero_factor_gives_a_negative_zero_product(spec, n):
    """a = (-2**-30, -0, -0) against ones: the first product rounds the accumulator to -0, and the
    -0 products after it keep it there, as the reference says (a factor splat as 0 + a is +0);
    rounded to fp16 first, the first product is -0 and +0 + -0 leaves the accumulator +0."""
    spec = parse_arith(spec)
    plan = emulate._plan(spec, False)
    a = torch.tensor([-2.0**-30, -0.0, -0.0]).repeat(1, 8, 1)
    got = torch.zeros(1, 8, n, dtype=torch.float64)
    chunk_products_(got, a, torch.ones(1, 3, n), spec.chunk or 1, plan.mul, plan.acc,
                    plan.exact_sums, not emulate._chunks_reduce(spec))
    want = reference.dot(a[0, 0].tolist(), [1.0] * 3, spec)  # -0; +0 where the product rounds to -0 first
    assert want == 0.0 and math.copysign(1.0, want) == (1.0 if spec.mul else -1.0)
    assert bool((got == 0).all()) and bool(torch.signbit(got).all()) == (spec.mul is None)


@pytest.mark.parametrize("spec, first", [("mul=fp16 acc=fp8_e5m2", -2.0**-20),
                                         ("mul=fp16 acc=fp8_e5m2 order=chunk(2)", -2.0**-20),
                                         ("mul=fp8_e5m2 acc=fp8_e4m3", -2.0**-16),
                                         ("mul=fp8_e5m2 acc=fp8_e4m3 order=chunk(8)", -2.0**-16)])
@pytest.mark.parametrize("n", [8, 11])
def test_a_negative_zero_factor_keeps_a_negative_zero_accumulator_with_rounded_products(spec, first, n):
    """a = (first, -0, ..., -0) (16 steps) against ones, products rounded in float32 lanes (chunk(8) of
    e5m2 products summed in float32, the others in float64): first is a subnormal of the product
    format and rounds to -0 in the accumulator's; the -0 products after it, and the chunk sums of
    -0 products, keep it there."""
    spec = parse_arith(spec)
    plan = emulate._plan(spec, False)
    a = torch.tensor([first] + [-0.0] * 15).repeat(1, 8, 1)
    got = torch.zeros(1, 8, n, dtype=torch.float64)
    chunk_products_(got, a, torch.ones(1, 16, n), spec.chunk or 1, plan.mul, plan.acc, plan.exact_sums,
                    not emulate._chunks_reduce(spec))
    want = reference.dot(a[0, 0].tolist(), [1.0] * 16, spec)
    assert want == 0.0 and math.copysign(1.0, want) == -1.0
    assert bool((got == 0).all()) and bool(torch.signbit(got).all())


def test_the_offset_gemm_refuses_what_it_cannot_read():
    """A format it does not round to, step tables of different lengths, a chunk length below 1
    and a float64 vector side are each refused, naming what is wrong."""
    grid = grid_of(parse("e6m9"), "nearest", 0)
    out, v, s = torch.zeros(8, dtype=torch.float64), torch.zeros(16), torch.zeros(4, dtype=torch.float64)
    steps, vectors, rows = torch.arange(4), torch.tensor([[0, 0, 8]]), torch.tensor([[0, 0]])
    with pytest.raises(ValueError, match="reference rounding"):
        offset_gemm_(out, v, s, steps, steps, vectors, rows, 2, grid_of(parse("e3m2(subnormals=false)"), "nearest", 0))
    with pytest.raises(ValueError, match="4 v steps, 3 s steps"):
        offset_gemm_(out, v, s, steps, steps[:3], vectors, rows, 2, grid)
    with pytest.raises(ValueError, match="chunk 0"):
        offset_gemm_(out, v, s, steps, steps, vectors, rows, 0, grid)
    with pytest.raises(ValueError, match="offset_gemm_: v must be"):
        offset_gemm_(out, v.double(), s, steps, steps, vectors, rows, 2, grid)
    offset_gemm_(out, v + 1, s + 2, steps, steps, vectors, rows, 2, grid)  # 4 products of 2: 8 in every lane
    assert torch.equal(out, torch.full((8,), 8.0, dtype=torch.float64))


def _float32_ties(targets: list[float], per_side: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (a, b) of float32 values whose float32 product is exactly a target and whose exact
    product is not: per_side each with the exact product above and below, for each target."""
    a = 1.0 + torch.arange(1, 400, dtype=torch.float32) * 2.0**-20
    pairs = []
    for t in targets:
        b0 = (t / a.double()).float()
        for b in (b0, torch.nextafter(b0, b0 + abs(t)), torch.nextafter(b0, b0 - abs(t))):
            exact = a.double() * b.double()
            hit = (a * b == t) & (exact != t)
            for side in (exact > t, exact < t):
                i = torch.nonzero(hit & side).flatten()[:per_side]
                pairs += list(zip(a[i].tolist(), b[i].tolist()))
    pairs = list(dict.fromkeys(pairs))
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


@pytest.mark.parametrize("name", ["fp8_e5m2", "fp8_e4m3", "fp16"])
def test_products_rounded_in_float32_are_rounded_by_their_exact_value(name):
    """The float32 product can land on a midpoint of the format, on the power of 2 above the
    product's binade, on the overflow threshold or on half the smallest subnormal where the exact
    product is just off it: every product is rounded as the reference rounds the exact one (a
    rounding of the float32 product would differ on some of these pairs, which the test checks).
    Products far past max overflow, also where the rounding's constant would not be finite."""
    spec = parse_arith(f"mul={name} acc=fp32")
    plan = emulate._plan(spec, False)
    assert rounds_in_float32(plan.mul)
    g = plan.mul
    grid = [(1 + j * 2.0**-g.man) * 2.0**e for e in (0, 3) for j in sorted({0, 1, 2, 2**g.man - 1})]  # odd, even
    midpoints = [x * (1 + 2.0**-(g.man + 1)) for x in grid if x < 2 ** 3]  # x + half its quantum
    targets = midpoints + [2.0, 8.0, g.overflow if g.overflow == float(torch.tensor(g.overflow)) else g.max
                           + 2 ** (math.floor(math.log2(g.max)) - g.man - 1), g.qmin / 2, g.qmin * 1.5]
    a, b = _float32_ties(targets + [-t for t in targets])
    assert len(a) > 4 * len(targets)
    huge = [2.0**j for j in range(30, 68)]  # products up to 2**131: the constant past float32's max
    a, b = torch.cat([a, torch.full((len(huge),), 2.0**64)]), torch.cat([b, torch.tensor(huge)])
    got = torch.zeros(1, len(a), len(b), dtype=torch.float64)
    chunk_products_(got, a[None, :, None], b[None, None, :], 1, plan.mul, plan.acc, plan.exact_sums)
    want = torch.tensor([[reference.dot([x], [y], spec) for y in b.tolist()] for x in a.tolist()], dtype=torch.float64)
    assert bool(((got[0] == want) | (got[0].isnan() & want.isnan())).all())
    assert bool(((torch.signbit(got[0]) == torch.signbit(want)) | want.isnan()).all())  # zeros' signs
    diagonal = torch.tensor([reference.dot([float(x * y)], [1.0], spec) for x, y in zip(a, b)], dtype=torch.float64)
    assert bool((diagonal != want.diagonal()).any())  # the pairs tell the two roundings apart


@pytest.mark.parametrize("name", ["fp8_e5m2", "fp8_e4m3", "fp16", "e6m9", "bf16", "fp32", "e8m2"])
def test_which_product_formats_round_in_float32(name):
    """In float32 lanes where the rounding's constant 1.5 * 2**23 * u stays finite up to max's binade
    and the quantum holds in float32; bf16's and e8m2's range, fp32's precision do not fit."""
    g = emulate._plan(parse_arith(f"mul={name} acc=fp32"), False).mul
    constant = 1.5 * 2.0**23 * 2.0 ** (math.floor(math.log2(g.max)) - g.man)
    fits = g.man <= 20 and constant < 2.0**127 and g.min_normal >= 2.0**-126
    assert rounds_in_float32(g) == fits and fits == (name in ("fp8_e5m2", "fp8_e4m3", "fp16", "e6m9"))


@pytest.mark.parametrize("spec", ["mul=fp8_e5m2 acc=fp32 order=chunk(32)", "mul=fp8_e4m3 acc=fp32 order=chunk(32)",
                                  "mul=fp8_e4m3 acc=fp32 order=chunk(128)", "mul=fp8_e5m2 acc=fp32 order=chunk(1024)"])
def test_chunk_sums_over_the_whole_range_of_the_products_are_exact(spec):
    """Chunks whose products run from the format's smallest subnormal to its max, both signs: the
    float32 sums (two split by binade, or one) are exact, as the float64 sum in order is; where
    float32 could not hold them (chunk(1024)) each product is summed in float64."""
    spec = parse_arith(spec)
    plan = emulate._plan(spec, False)
    g, k = plan.mul, spec.chunk
    split = float32_sums(g, k)
    assert (split is None) == (k == 1024) and (split == math.inf) == (spec.mul.man == 3 and k == 32)
    gen = torch.Generator().manual_seed(k)
    lo, hi = round(math.log2(g.min_normal)), math.floor(math.log2(g.max))
    binades = torch.randint(lo, hi + 1, (2 * k + 3, 8), generator=gen)
    b = (1 + torch.randint(0, 2**g.man, binades.shape, generator=gen) * 2.0**-g.man) * torch.exp2(binades.double())
    b = b.clamp(max=g.max)  # no product overflows (the kernel is told so)
    b[::5] = g.max
    b[1::7] = g.qmin * torch.randint(1, 2**g.man, b[1::7].shape, generator=gen)  # subnormals
    b = (b * torch.where(torch.rand(b.shape, generator=gen) < 0.5, -1.0, 1.0)).float()
    a = torch.ones(2, b.shape[0])
    a[1, ::3] = -1.0
    got = torch.zeros(1, 2, 8, dtype=torch.float64)
    chunk_products_(got, a[None], b[None], k, g, plan.acc, plan.exact_sums, not emulate._chunks_reduce(spec),
                    (1.0, g.max))
    want = torch.tensor([[reference.dot(a[m].tolist(), b[:, n].tolist(), spec) for n in range(8)] for m in range(2)],
                        dtype=torch.float64)
    assert torch.equal(got[0], want)
    first = (a[0, :k, None] * b[:k]).double()  # the first chunk's products
    exact_in_float32 = bool((first.float().sum(0, dtype=torch.float32).double() == first.sum(0)).all())
    assert exact_in_float32 or split != math.inf
    assert not exact_in_float32 or spec.mul.man != 2  # e5m2's 30 binades: one float32 sum of this data rounds


def _mul_grid(spec: str):
    return emulate._plan(parse_arith(spec), False).mul


def test_integer_sums_serve_where_no_partial_sum_reaches_2_31_counts():
    """e5m2 products (2**16 counts of its smallest subnormal per unit) in chunks of 32: up to a bound
    of about 1024 per product; not where one float32 sum serves (e4m3), below chunk(8), for an
    unknown (NaN, inf) bound, nor where a scaled by 2**16 would pass float32's range."""
    e5m2, e4m3 = _mul_grid("mul=fp8_e5m2 acc=fp32"), _mul_grid("mul=fp8_e4m3 acc=fp32")
    assert integer_sums(e5m2, 32, (4.5, 4.5)) == 2.0**16
    assert integer_sums(e5m2, 1024, (1.0, 1.0)) == 2.0**16  # a chunk float32 could not sum at all
    below = (2.0**31 / 32 / 2.0**16 - e5m2.qmin) / 1.25  # k * (x * 1.25 + qmin) * 2**16 = 2**31 counts
    assert integer_sums(e5m2, 32, (1.0, below * (1 - 2.0**-20))) == 2.0**16
    assert integer_sums(e5m2, 32, (1.0, below)) is None
    assert integer_sums(e4m3, 32, (1.0, 1.0)) is None and float32_sums(e4m3, 32) == math.inf
    assert integer_sums(e5m2, 4, (1.0, 1.0)) is None
    assert integer_sums(e5m2, 32, (float("nan"), 1.0)) is None and integer_sums(e5m2, 32, (math.inf, 0.0)) is None
    assert integer_sums(e5m2, 32, (2.0**112, 2.0**-120)) is None and integer_sums(e5m2, 32, (2.0**111, 2.0**-120))


@pytest.mark.parametrize("spec", ["mul=fp8_e5m2 acc=fp32 order=chunk(32)", "mul=fp8_e5m2 acc=e5m10 order=chunk(8)",
                                  "mul=fp16 acc=fp32 order=chunk(16)"])
@pytest.mark.parametrize("threads", [1, 2])
def test_chunks_summed_as_integer_counts_equal_the_reference(spec, threads):
    """Products rounded from float32 factors (ties and the subnormals included), in chunks whose
    partial sums come near 2**31 counts of the smallest subnormal: the int32 sums, a scaled by the
    inverse of that subnormal, give the float sums (every product checked for overflow) and the
    reference dot product bit for bit."""
    spec = parse_arith(spec)
    plan = emulate._plan(spec, False)
    g, k = plan.mul, spec.chunk
    gen = torch.Generator().manual_seed(k)
    top = 2.0**31 * g.qmin / k / 1.25 * 0.99  # near the bound integer_sums allows
    a = torch.rand(2, 3, 3 * k + 5, generator=gen) * torch.where(torch.rand(2, 3, 3 * k + 5, generator=gen) < 0.5, -1, 1)
    a[:, 0] = 1.0  # row 0: b's values as they are, each chunk at its largest sum
    b = torch.full((2, 3 * k + 5, 16 * 8 + 11), top)  # a row of 8 whole vectors, a tail of 11
    b[:, 1::3] = torch.rand(b[:, 1::3].shape, generator=gen) * top
    b[:, 2::5] = g.qmin * torch.randint(0, 8, b[:, 2::5].shape, generator=gen) * 0.75  # subnormal products, ties
    b[0, :4, :3] = torch.tensor([1.0 + 2.0**-g.man / 2, -(1.0 + 2.0**-g.man / 2), 0.0])[None]  # exact midpoints
    largest = emulate._largest(a, b)
    assert emulate._chunks_reduce(spec) and integer_sums(g, k, largest) == 1 / g.qmin  # zeros unsigned: it serves
    got = torch.zeros(2, 3, b.shape[-1], dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        chunk_products_(got, a, b, k, g, plan.acc, plan.exact_sums, False, largest)
    finally:
        torch.set_num_threads(previous)
    assert float(got.abs().max()) > k * top * 0.9  # a sum near the bound was formed
    floats = torch.zeros_like(got)  # no bound given: every product checked for overflow, float sums
    chunk_products_(floats, a, b, k, g, plan.acc, plan.exact_sums, False)
    assert torch.equal(got, floats)
    columns = [*range(16), 57, *range(128, b.shape[-1])]  # a whole vector, one lane of another, the tail
    for i in range(2):
        want = torch.tensor([[reference.dot(a[i, m].tolist(), b[i, :, n].tolist(), spec) for n in columns]
                             for m in range(3)], dtype=torch.float64)
        assert torch.equal(got[i][:, columns], want)


@pytest.mark.parametrize("spec", ["acc=e10m26 order=chunk(16)", "mul=fp8_e5m2 acc=e10m26 order=chunk(16)",
                                  "acc=e8m30 order=chunk(8)", "mul=fp16 acc=e5m10",
                                  "mul=fp8_e4m3 acc=fp32 order=chunk(32)"])
def test_a_float32_result_is_the_float64_one_rounded_to_nearest(spec):
    """Written in float32, the result is the float64 one converted as ``.to(torch.float32)`` does it,
    bit for bit: accumulators with more precision or range than float32 (ties of the conversion,
    past float32's max, in its subnormals), infs and NaNs from the operands."""
    spec = parse_arith(spec)
    plan = emulate._plan(spec, False)
    k = spec.chunk or 1
    a, b = _products_operands(2, 5, 3 * k + 3, 16 * 2 + 13, seed=7)
    a[0, 1:3] *= 2.0**118  # exact products past float32's range (e10m26 holds them)
    a[0, 3:5] = torch.rand(2, a.shape[-1], generator=torch.Generator().manual_seed(1)) * 2.0**-136  # its subnormals
    wide = torch.empty(2, 5, b.shape[-1], dtype=torch.float64)
    narrow = torch.empty(2, 5, b.shape[-1], dtype=torch.float32)
    for out in (wide, narrow):
        chunk_products_(out, a, b, k, plan.mul, plan.acc, plan.exact_sums, not emulate._chunks_reduce(spec))
    want = wide.to(torch.float32)
    assert bool(((narrow.view(torch.int32) == want.view(torch.int32)) | want.isnan()).all())
    assert torch.equal(narrow.isnan(), want.isnan()) and bool((~narrow.isfinite()).any())
    assert spec.acc.man <= 23 or bool((wide != narrow.double()).any())  # the conversion rounded some
    if spec.mul is None and spec.acc.emax > 127:
        assert bool((narrow.isinf() & wide.isfinite()).any()) and bool(((narrow.abs() < 2.0**-126) & (narrow != 0)).any())


@pytest.mark.parametrize("n", [8, 16, 32])
def test_narrow_exact_gemms_write_a_float32_result_too(n):
    """The exact products' row kernel (N of 8, 16 or 32 columns) stores float32 as the general one does."""
    spec = parse_arith("acc=e10m26 order=chunk(4)")
    plan = emulate._plan(spec, False)
    a, b = _products_operands(1, 16, 19, n, seed=n)
    a[0, 1:3] *= 2.0**118  # sums past float32's range
    wide, narrow = torch.empty(1, 16, n, dtype=torch.float64), torch.empty(1, 16, n, dtype=torch.float32)
    for out in (wide, narrow):
        chunk_products_(out, a, b, 4, None, plan.acc, plan.exact_sums, not emulate._chunks_reduce(spec))
    want = wide.to(torch.float32)
    assert bool(((narrow.view(torch.int32) == want.view(torch.int32)) | want.isnan()).all())
    assert bool((narrow.isinf() & wide.isfinite()).any()) and bool((wide != narrow.double()).any())


@pytest.mark.parametrize("name", FORMATS)
def test_a_bias_add_by_the_fold_kernel_is_torchs_rounded_add(monkeypatch, name):
    """``emulate.rounded_add_`` (``bodies.add_bias`` in place by the fold kernel) equals torch's
    ``round_exact(two_sum(y, bias))`` bit for bit: ties with an error behind them, overflow,
    subnormals, zeros of both signs, inf and NaN, a bias broadcast over channels."""
    spec = parse_arith(f"acc={name}")
    y = _hard_partials(1, 4, 80, parse(name), seed=3).reshape(2, 8, 4, 5)
    bias = _hard_partials(1, 2, 8, parse(name), seed=4)[0, 1].reshape(1, 8, 1, 1)  # ties, inf, -inf, NaN
    y[0, 3], y[1, 3], bias[0, 3] = -0.0, 0.0, -0.0  # -0 + -0 is -0, +0 + -0 is +0
    got = y.clone()
    assert emulate.rounded_add_(got, bias, spec)
    want = round_exact(*two_sum(y, bias.expand(y.shape)), grid_of(parse(name), "nearest", spec.sr_bits_for(spec.acc)),
                       "nearest")
    same = (got.view(torch.int64) == want.view(torch.int64)) | (got.isnan() & want.isnan())
    assert bool(same.all()) and bool(got.isnan().any())
    assert bool((got[:, 3] == 0).all()) and bool(torch.signbit(got[0, 3]).all()) == bool(parse(name).neg_zero)
    assert not bool(torch.signbit(got[1, 3]).any())
    assert not emulate.rounded_add_(y.clone(), bias, parse_arith(f"acc={name} rounding=stochastic"))
