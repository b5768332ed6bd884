"""Emulated dot products: a batched GEMM whose every multiply and add is rounded as a spec says.

Vectorised over output elements; the loop runs over the reduction dimension only, a block of
steps at a time. On the CPU, with float32 operands and nearest rounding, one C++ kernel runs the
whole GEMM (``ChunkFold.products``: every product and sum in registers, as these steps do
them), except exact chunk sums over a large b, which come from float64 GEMMs over k-slices.
Elsewhere large CPU problems run each block as one compiled kernel (inductor fuses the block's
steps into one pass over the accumulator, which stays in registers); small ones run the same
code eagerly. ``chunk(k)`` with exact float64 chunk sums sums each chunk's rounded products in
one reduction instead. Where every addend lies on a grid whose float64 sum is
exact (FP8 or fp16 products into an fp16 accumulator), an add is one float64 add with no
error term. Bit-identical to ``reference.dot`` for every order (``chunk(k)`` where
``chunk_is_exact``).

Random bits: rounding step ``step`` of stream ``stream`` for output element ``i`` uses
``counter_words(i, stream_seed(seed, stream, step))``; the stream numbers are those of
``reference``.
"""
from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass
from typing import Callable

import torch

from ..backends import load_plugins, run_or_fall_back
from ..formats import FloatFormat
from ..profiling import section
from ..random_bits import counter_words, stream_seed
from .exact import Grid, grid_of, round_exact, two_prod, two_sum
from .spec import STREAM_ADD, STREAM_KAHAN, STREAM_MUL, ArithSpec, SpecError

__all__ = ["emulated_matmul", "chunk_is_exact", "COMPILE_MIN_WORK", "COMPILE_MIN_STEPS", "set_compile",
           "ChunkFold", "register_chunk_fold", "offsets_kernel", "products_overflow", "rounded_add_"]

COMPILE_MIN_WORK = 1 << 16  # output elements x reduction steps from which a block is compiled
COMPILE_MIN_STEPS = 64  # ... if the reduction has at least this many steps (else eager is cheap)
_BLOCK = 8  # reduction steps per compiled kernel call
_SLAB = 8  # chunks per compiled kernel call of the chunk-sum path, if rounding them is cheap
_EAGER_ELEMS = 1 << 22  # products materialised at once by eager code
_KERNEL_B_BYTES = 1 << 21  # the largest float64 b the products kernel takes for exact chunk sums: it
# reads b again for every 8 output vectors, from cache; a larger b is the float64 GEMMs' (blocked)
_GROUP_BYTES = 1 << 24  # a chunk(k) GEMM's float64 chunk operands and sums held at once: below
# glibc's mmap threshold (32 MB at most), they reuse freed memory instead of faulting in fresh pages
_compile_enabled = True


@dataclass(frozen=True)
class ChunkFold:
    """A kernel that rounds chunk sums into the accumulator, ``acc = round(acc + P_j)`` to
    nearest for each chunk in order (``codegen.chunk_fold_cpu``, a plug-in of the torch backend).

    Attributes:
        fold: ``fold(acc (B, ...), partials (B, chunks, ...), grid)`` in place; returns how many
            adds met a zero chunk sum on a -0 accumulator.
        products: ``products(acc (B, M, N), a (B, M, K) float32, b (B, K, N) float32, k, mul grid
            or None, grid, exact_sums, signed_zeros, largest)``: the whole GEMM, its products formed
            (and rounded to nearest on the mul grid) in the kernel, as ``_steps`` does it (chunks of
            k products, each summed from its first; k = 1: sequential); largest: (max|a|, max|b|).
        serves: whether it runs here for a grid (raising where it cannot be built).
        offsets: ``offsets(out, v, s, v_steps, s_steps, vectors, rows, k, grid, mul, exact_sums,
            signed_zeros, overflow)``: ``products``' GEMM with its operands read at offsets that
            tables give (``ops.implicit_conv``; ``codegen.chunk_fold_cpu.offset_gemm_``).
    """

    fold: Callable[[torch.Tensor, torch.Tensor, Grid], int]
    products: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, Grid | None, Grid, bool, bool,
                        tuple[float, float]], None]
    serves: Callable[[Grid], bool]
    offsets: Callable[..., None]


_CHUNK_FOLD: list[ChunkFold] = []


def register_chunk_fold(kernel: ChunkFold) -> None:
    """Fold the chunk sums of CPU ``chunk(k)`` GEMMs with ``kernel`` from now on."""
    _CHUNK_FOLD[:] = [kernel]


def set_compile(enabled: bool) -> None:
    """Allow (default) or forbid compiled kernels for large CPU problems."""
    global _compile_enabled
    _compile_enabled = enabled


@dataclass(frozen=True)
class _Plan:
    """Static facts of one emulated GEMM (compiled kernels are cached by plan)."""

    spec: ArithSpec
    split_products: bool  # float64 operands: products need two_prod to be exact
    mul: Grid | None
    acc: Grid
    n_mul: int
    n_acc: int
    exact_sums: bool  # every add's operands are on grids whose float64 sum is exact


@functools.lru_cache(maxsize=256)
def _plan(spec: ArithSpec, split_products: bool) -> _Plan:
    n_mul = spec.sr_bits_for(spec.mul) if spec.mul else 0
    n_acc = spec.sr_bits_for(spec.acc)
    mul = grid_of(spec.mul, spec.mul_rounding, n_mul) if spec.mul else None
    return _Plan(spec, split_products, mul, grid_of(spec.acc, spec.rounding, n_acc), n_mul, n_acc,
                 _sums_are_exact(spec))


def _sums_are_exact(spec: ArithSpec) -> bool:
    """Whether the float64 sum of any two addends of the accumulation is exact, so that no
    error term is needed: acc values and terms (products, chunk sums of ``chunk`` products) are
    multiples of the smaller quantum Q and at most P in magnitude, and 2 * P / Q <= 2**53."""
    if spec.mul is None:
        return False
    formats = (spec.acc, spec.mul)
    if not all(f.signed and f.has_zero and f.subnormals for f in formats):
        return False
    quantum = min(f.min_subnormal for f in formats)
    top = max(spec.acc.max, spec.mul.max * (spec.chunk or 1))
    return math.log2(top) + 1 - math.log2(quantum) <= 53


def chunk_is_exact(spec: ArithSpec, a_fmt: FloatFormat | None, b_fmt: FloatFormat | None) -> bool:
    """Whether a float64 sum of ``spec.chunk`` products is exact, so that ``chunk(k)`` is
    bit-identical on every backend: all products are multiples of a quantum Q and at most P
    in magnitude (Q, P of the mul format, else of the operands' formats), and k * P / Q < 2**53."""
    if spec.chunk is None:
        return True
    if spec.mul is not None:
        quantum, top = spec.mul.min_subnormal, spec.mul.max
    elif a_fmt is not None and b_fmt is not None:
        quantum, top = a_fmt.min_subnormal * b_fmt.min_subnormal, a_fmt.max * b_fmt.max
    else:
        return False
    return math.log2(spec.chunk) + math.log2(top) - math.log2(quantum) < 53


def _bits(index: torch.Tensor, seed: torch.Tensor | None) -> torch.Tensor | None:
    return None if seed is None else counter_words(index, seed)


def _accumulate(plan: _Plan, acc, comp, term, index, seeds):
    """One rounded add of ``term`` into the running sum (Kahan-compensated if the spec says).

    ``seeds``: None, or an int64 tensor of the step's seeds per stream (``STREAM_ADD`` and, for
    Kahan, ``STREAM_KAHAN``) for stochastic rounding. Returns (acc, comp).
    """
    g, mode, n = plan.acc, plan.spec.rounding, plan.n_acc

    def rounded_sum(x, y, stream):
        s, e = (x + y, None) if plan.exact_sums else two_sum(x, y)
        return round_exact(s, e, g, mode, _bits(index, None if seeds is None else seeds[stream]), n)

    if not plan.spec.kahan:
        return rounded_sum(acc, term, STREAM_ADD), comp
    y = rounded_sum(term, -comp, STREAM_KAHAN[0])
    t = rounded_sum(acc, y, STREAM_KAHAN[1])
    z = rounded_sum(t, -acc, STREAM_KAHAN[2])
    return t, rounded_sum(z, -y, STREAM_KAHAN[3])


def _product(plan: _Plan, a_col, b_row, index, seed, signed_zeros: bool = True, overflow: bool = True):
    if plan.split_products:
        p, e = two_prod(a_col, b_row)
    else:
        p, e = a_col * b_row, None  # exact: the operands have at most 24 significant bits
    if plan.mul is None:
        return p
    return round_exact(p, e, plan.mul, plan.spec.mul_rounding, _bits(index, seed), plan.n_mul, signed_zeros, overflow)


def _block(plan: _Plan, acc, comp, partial, a, b, index, seeds, *, ends: tuple[bool, ...]):
    """Steps u of a block: products a[..., u] * b[..., u, :]; sequential adds each into acc,
    chunk orders sum them into ``partial`` and add that into acc where ``ends[u]``."""
    chunked = plan.spec.chunk is not None
    for u, end in enumerate(ends):
        step_seeds = None if seeds is None else seeds[:, u]
        p = _product(plan, a[..., u:u + 1], b[..., u:u + 1, :], index, None if seeds is None else step_seeds[STREAM_MUL])
        if not chunked:
            acc, comp = _accumulate(plan, acc, comp, p, index, step_seeds)
            continue
        partial = p if partial is None else partial + p
        if end:
            acc, comp = _accumulate(plan, acc, comp, partial, index, step_seeds)
            partial = None
    return acc, comp, partial


def _chunk_slab(plan: _Plan, acc, comp, a, b, index, mul_seeds, add_seeds, *, overflow: bool):
    """Chunks j of a slab: the exact float64 sum of chunk j's rounded products (one reduction;
    exact, so its order is free, and the sign of a zero cannot matter: ``_chunks_reduce``), then
    one rounded add of it into acc."""
    B, M, L = a.shape
    N, k = b.shape[-1], plan.spec.chunk
    c = L // k
    a, b = a.to(torch.float64).view(B, M, c, k, 1), b.view(B, 1, c, k, N)
    products = _product(plan, a, b, None if index is None else index[:, :, None, None, :],
                        None if mul_seeds is None else mul_seeds.view(c, k, 1), False, overflow)
    terms = products.sum(-2)
    for j in range(c):
        acc, comp = _accumulate(plan, acc, comp, terms[..., j, :], index, None if add_seeds is None else add_seeds[:, j])
    return acc, comp


# inductor inlines a value into each of its users until its expression has this many ops (30
# by default); generating code for chains of rounded adds (Kahan's above all) would take minutes
_STEP_OPTIONS = {"realize_opcount_threshold": 24}
_KERNELS: dict[tuple, object] = {}
_FAILED: set[tuple] = set()


def _kernel(key: tuple, fn, options: dict):
    kernel = _KERNELS.get(key)
    if kernel is None:
        def run(*args):
            return fn(*args)

        # a code object per key: dynamo's cache (and its recompile limit) is per code object
        code = run.__code__.replace(co_name=f"emulated_block_{len(_KERNELS)}")
        run = types.FunctionType(code, run.__globals__, code.co_name, None, run.__closure__)
        kernel = _KERNELS[key] = torch.compile(run, fullgraph=True, options=options)
    return kernel


def _call(compiled: bool, key: tuple, fn, args: tuple, rows: tuple, options: dict | None = None):
    """``fn(*args)``, as a kernel compiled once per ``key`` if ``compiled``. Dims 0 and 1 (batch
    and rows, which vary by layer) of the ``rows`` tensors are dynamic; the rest is static."""
    if not compiled:
        return fn(*args)

    def kernel():
        for t in rows:
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 1)
        return _kernel(key, fn, options or {})(*args)

    return run_or_fall_back(_FAILED, key, kernel, lambda: fn(*args), f"the compiled emulated GEMM for {key[0].spec}",
                            stacklevel=5)


def _step_seeds(seed: int | None, streams: int, steps: range, device) -> torch.Tensor | None:
    if seed is None:
        return None
    return torch.tensor([[stream_seed(seed, s, k) for k in steps] for s in range(streams)],
                        dtype=torch.int64, device=device)


def emulated_matmul(a: torch.Tensor, b: torch.Tensor, spec: ArithSpec, *, seed: int | None = None,
                    index: torch.Tensor | None = None, exact_products: bool = False,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``a @ b`` with the arithmetic of ``spec``: float64 holding values of ``spec.acc``, or those
    values rounded to nearest in ``dtype``, as ``.to(dtype)`` (the products kernel writes float32 so).

    Args:
        a: (B, M, K) float tensor; b: (B, K, N), same dtype and device.
        spec: a non-native arithmetic spec.
        seed: 32-bit seed of the random bits (required if any rounding is stochastic).
        index: int64 (B, M, N): the number of each output element in the op's output (the
            counter of its random bits); default row-major.
        exact_products: the products are exact in float64 whatever the dtype (b is all ones).
        dtype: the result's dtype.
    """
    split = a.dtype == torch.float64 and not exact_products
    if split and spec.mul is None:
        raise SpecError(f"arithmetic {spec}: float64 operands need a mul format (products of float64 "
                        f"values are not exact in float64); use float32 operands or set mul")
    plan = _plan(spec, split)
    if spec.stochastic and seed is None:
        raise ValueError("emulated_matmul: stochastic rounding needs a seed")
    B, M, K = a.shape
    N = b.shape[-1]
    if not spec.stochastic:
        seed = index = None
    elif index is None:
        index = torch.arange(B * M * N, dtype=torch.int64, device=a.device).view(B, M, N)
    kernel = _products_kernel(plan, a.dtype, a.device)
    by_gemm = spec.chunk is not None and spec.mul is None and not split
    if kernel is not None and not (by_gemm and B * K * N * 8 > _KERNEL_B_BYTES):
        out = torch.empty(B, M, N, dtype=torch.float32 if dtype == torch.float32 else torch.float64, device=a.device)
        with section("fused gemm"):
            largest = _largest(a, b) if plan.mul is not None else (math.inf, math.inf)  # exact products: unused
            kernel.products(out, a.contiguous(), b.contiguous(), spec.chunk or 1, plan.mul, plan.acc, plan.exact_sums,
                            not _chunks_reduce(spec), largest)
        return out.to(dtype)
    return _emulated_by_torch(plan, a, b, index, seed, by_gemm).to(dtype)


def _emulated_by_torch(plan: _Plan, a, b, index, seed, by_gemm: bool) -> torch.Tensor:
    """``emulated_matmul``'s float64 result where the products kernel does not run it."""
    spec = plan.spec
    B, M, K = a.shape
    acc = torch.zeros(B, M, b.shape[-1], dtype=torch.float64, device=a.device)
    comp = torch.zeros_like(acc) if spec.kahan else None
    compiled = _compile_enabled and a.device.type == "cpu" and acc.numel() * K >= COMPILE_MIN_WORK
    if by_gemm:  # converts a block of a and b at a time
        return _chunks_by_gemm(plan, acc, comp, a, b, index, seed)
    b64 = b.to(torch.float64)
    if _chunks_reduce(spec):  # reads a[m, k] once per 8 products: converts it in the kernel
        with section("fused gemm"):
            return _chunks_by_reduction(plan, compiled, acc, comp, a, b64, index, seed)
    a64 = a.to(torch.float64)
    with section("fused gemm"):
        if spec.order == "pairwise":
            return _pairwise(plan, a64, b64, index, seed)
        return _steps(plan, compiled and K >= COMPILE_MIN_STEPS, acc, comp, a64, b64, index, seed)


def _chunks_reduce(spec: ArithSpec) -> bool:
    """Whether each chunk's products may be summed by one reduction: their float64 sum is exact
    (so any order gives it) and its sign, if zero, cannot matter. A reduction starts from +0, so
    products that are all -0 sum to +0, not IEEE's -0; that differs only when added to an acc
    of -0, which cannot arise if the format has no -0 or no nonzero exact sum rounds to zero
    (every term is a multiple of the acc format's subnormal quantum)."""
    if spec.chunk is None or spec.mul is None or not chunk_is_exact(spec, None, None):
        return False
    return not spec.acc.neg_zero or (spec.acc.subnormals and spec.mul.min_subnormal >= spec.acc.min_subnormal)


def _steps(plan: _Plan, compiled: bool, acc, comp, a, b, index, seed):
    """Products one reduction step at a time (``_BLOCK`` steps per call when compiled)."""
    K, k = a.shape[-1], plan.spec.chunk
    width = _BLOCK if compiled else K
    partial = None
    streams = 5 if plan.spec.kahan else 2
    for k0 in range(0, K, width):
        steps = range(k0, min(k0 + width, K))
        seeds = _step_seeds(seed, streams, steps, a.device)
        if k is None:
            ends = (False,) * len(steps)
        else:
            ends = tuple((i + 1) % k == 0 or i == K - 1 for i in steps)
            if seeds is not None:  # adds are numbered by chunk, products by k
                adds = _step_seeds(seed, streams, range(k0 // k, k0 // k + len(steps)), a.device)
                chunk_of = torch.tensor([i // k - k0 // k for i in steps], device=a.device)
                seeds = torch.cat([seeds[:1], adds[1:, chunk_of]])
        full = compiled and len(steps) == width  # a short tail runs eagerly: no kernel for its length
        key = (plan, ends, partial is not None, comp is not None, seeds is not None)
        args = (acc, comp, partial, a[..., k0:k0 + len(steps)], b[..., k0:k0 + len(steps), :], index, seeds)
        acc, comp, partial = _call(full, key, functools.partial(_block, plan, ends=ends), args,
                                   (acc, comp, partial, args[3], index), _STEP_OPTIONS)
    return acc


def _chunks_by_reduction(plan: _Plan, compiled: bool, acc, comp, a, b, index, seed):
    """chunk(k) with exact chunk sums: ``_SLAB`` chunks per call. K is padded to whole chunks
    with products -0 * 0, which leave every sum as it is."""
    B, M, K = a.shape
    N, k = b.shape[-1], plan.spec.chunk
    rows = max(1, _EAGER_ELEMS // max(1, B * N * k))
    if not compiled and rows < M:  # eager code holds a chunk's products: bound them by rows
        for r in range(0, M, rows):
            part = slice(r, r + rows)
            acc[:, part] = _chunks_by_reduction(plan, False, acc[:, part], None if comp is None else comp[:, part],
                                                a[:, part], b, None if index is None else index[:, part], seed)
        return acc
    overflow = not _products_below_overflow(plan, a, b)
    pad = -K % k
    if pad:
        a = torch.nn.functional.pad(a, (0, pad), value=-0.0)
        b = torch.nn.functional.pad(b, (0, 0, 0, pad))
    chunks = (K + pad) // k
    cheap = plan.spec.rounding == "nearest" and not plan.spec.kahan  # else code generation takes minutes
    slab = (_SLAB if cheap else 1) if compiled else max(1, min(chunks, _EAGER_ELEMS // max(1, B * M * N * k)))
    streams = 5 if plan.spec.kahan else 2
    for j0 in range(0, chunks, slab):
        c = min(slab, chunks - j0)
        mul_seeds = _step_seeds(seed, 1, range(j0 * k, (j0 + c) * k), a.device)
        add_seeds = _step_seeds(seed, streams, range(j0, j0 + c), a.device)
        args = (acc, comp, a[..., j0 * k:(j0 + c) * k], b[..., j0 * k:(j0 + c) * k, :], index,
                mul_seeds, add_seeds)
        key = (plan, "chunks", c, comp is not None, seed is not None, overflow)
        acc, comp = _call(compiled, key, functools.partial(_chunk_slab, plan, overflow=overflow), args,
                          (acc, comp, args[2], index))
    return acc


def _largest(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """max|a| and max|b| (NaN where a NaN is in; 0 where empty), whose product bounds every product's
    magnitude (exactly in float64, for float32 operands)."""
    def largest(x: torch.Tensor) -> float:
        if x.numel() == 0:
            return 0.0
        lo, hi = torch.aminmax(x)  # one pass, no |x| copy; a NaN makes both NaN
        lo, hi = lo.item(), hi.item()
        return hi if math.isnan(hi) else max(-lo, hi)
    return largest(a), largest(b)


def _products_below_overflow(plan: _Plan, a, b) -> bool:
    """Whether no product can round to nearest above the mul format's max, by the operands'
    largest magnitudes (NaN and inf say no)."""
    if plan.split_products or plan.spec.mul_rounding != "nearest":
        return False
    a_max, b_max = _largest(a, b)
    return a_max * b_max < plan.mul.overflow


def _chunks_by_gemm(plan: _Plan, acc, comp, a, b, index, seed):
    """chunk(k) with exact products: the chunk sums come from float64 GEMMs over k-slices of the
    reduction, folded into acc in order by the CPU kernel where it takes the spec (nearest, no
    Kahan), else by torch a chunk at a time. A chunk sum of zero on a -0 acc is the one place a
    GEMM's +0 can differ from the products' sum: there the kernel's fold is redone by torch,
    which looks at the products."""
    nearest = seed is None and comp is None and plan.spec.rounding == "nearest"
    fold = _fold_kernel(plan.acc) if nearest and a.device.type == "cpu" else None
    if fold is None:
        return _chunks_folded_by_torch(plan, acc, comp, a, b, index, seed)
    B, M, K = a.shape
    N, k = b.shape[-1], plan.spec.chunk
    chunks = -(-K // k)
    rows = max(1, min(M, _GROUP_BYTES // (8 * (k + N))))  # a row block's chunk of a and its sums
    group = max(1, min(chunks, _GROUP_BYTES // (8 * (rows * (k + N) + k * N))))  # ... and b's chunk
    for i in range(B):
        for j0 in range(0, chunks, group):  # each row still meets its chunks in order
            cols = slice(j0 * k, min(K, (j0 + group) * k))
            with section("gemm products"):
                b64 = b[i, cols].to(torch.float64)  # once for all row blocks
            for r0 in range(0, M, rows):
                with section("gemm products"):
                    sums = _chunk_sums(a[i, r0:r0 + rows, cols], b64, min(group, chunks - j0), k)
                with section("chunk rounding"):
                    if fold.fold(acc[i, r0:r0 + rows][None], sums[None], plan.acc):  # a zero sum met a -0
                        # acc: torch decides, from the +0 every emulated GEMM starts at
                        return _chunks_folded_by_torch(plan, acc.zero_(), comp, a, b, index, seed)
    return acc


def _chunk_sums(a: torch.Tensor, b64: torch.Tensor, c: int, k: int) -> torch.Tensor:
    """(c, M, N) float64: the sums of the c chunks of (M, L) @ (L, N), each a GEMM over its k
    columns of a (converted to float64 once, and read as (c, M, k) with row stride L) and rows of
    float64 ``b64``; the last chunk may be shorter."""
    M, L = a.shape
    N = b64.shape[-1]
    full = L // k
    a64 = a.to(torch.float64)
    sums = torch.empty((c, M, N), dtype=torch.float64, device=a.device)
    if full:
        torch.bmm(a64[:, :full * k].unflatten(-1, (full, k)).transpose(0, 1), b64[:full * k].unflatten(0, (full, k)),
                  out=sums[:full])
    if full < c:
        torch.mm(a64[:, full * k:], b64[full * k:], out=sums[full])
    return sums


def _chunks_folded_by_torch(plan: _Plan, acc, comp, a, b, index, seed):
    """chunk(k) with exact products, a chunk at a time: its sum one float64 GEMM, rounded into acc
    by torch's operations (``_accumulate``), the signs of zero sums from the products."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    K, k = a.shape[-1], plan.spec.chunk
    streams = 5 if plan.spec.kahan else 2
    for j, k0 in enumerate(range(0, K, k)):
        with section("gemm products"):
            partial = _fix_zero_signs(torch.matmul(a[..., k0:k0 + k], b[..., k0:k0 + k, :]), acc, comp,
                                      a[..., k0:k0 + k], b[..., k0:k0 + k, :])
        seeds = _step_seeds(seed, streams, range(j, j + 1), a.device)
        with section("chunk rounding"):
            acc, comp = _accumulate(plan, acc, comp, partial, index, None if seeds is None else seeds[:, 0])
    return acc


def _products_kernel(plan: _Plan, dtype: torch.dtype, device: torch.device) -> ChunkFold | None:
    """The fold kernel where it forms a GEMM's products itself: sequential or chunk order,
    float32 operands on the CPU, every rounding to nearest, no Kahan, the grids served."""
    spec = plan.spec
    if not (spec.order != "pairwise" and dtype == torch.float32 and device.type == "cpu"
            and not spec.kahan
            and spec.rounding == "nearest" and (spec.mul is None or spec.mul_rounding == "nearest")):
        return None
    kernel = _fold_kernel(plan.acc)
    return kernel if kernel is not None and (plan.mul is None or kernel.serves(plan.mul)) else None


def offsets_kernel(spec: ArithSpec, dtype: torch.dtype, device: torch.device) -> Callable[..., None] | None:
    """``ChunkFold.offsets`` bound to ``spec``'s chunk length, formats and product rounding, where it
    runs a GEMM of ``spec`` on ``dtype`` operands here as ``emulated_matmul`` would (float32 operands,
    as ``_products_kernel``); else None. The caller passes ``overflow`` (``products_overflow``)."""
    if dtype != torch.float32:
        return None
    plan = _plan(spec, False)
    kernel = _products_kernel(plan, dtype, device)
    if kernel is None:
        return None
    return functools.partial(kernel.offsets, k=spec.chunk or 1, grid=plan.acc, mul=plan.mul,
                             exact_sums=plan.exact_sums, signed_zeros=not _chunks_reduce(spec))


def products_overflow(spec: ArithSpec, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a product of ``a``'s and ``b``'s values may round past ``spec.mul``'s largest value
    (by their extremes; no mul format: no)."""
    return spec.mul is not None and not _products_below_overflow(_plan(spec, False), a, b)


def rounded_add_(acc: torch.Tensor, p: torch.Tensor, spec: ArithSpec) -> bool:
    """``acc = round(acc + p)`` once, to nearest on ``spec.acc``, in place, by the fold kernel
    (``round_exact(two_sum(acc, p))`` operation for operation, as torch computes it) where it
    serves: float64 contiguous CPU ``acc``, nearest rounding; else False and acc is untouched.

    Args:
        acc: float64, the accumulator values.
        p: what is added, broadcastable to acc.
        spec: the arithmetic whose accumulator format rounds the sum.
    """
    if not (spec.rounding == "nearest" and acc.dtype == torch.float64 and acc.is_contiguous()
            and acc.device.type == "cpu"):
        return False
    grid = _plan(spec, False).acc
    fold = _fold_kernel(grid)
    if fold is None:
        return False
    terms = p.to(torch.float64).expand(acc.shape).reshape(1, 1, -1)  # one chunk: a contiguous copy
    fold.fold(acc.view(1, -1), terms, grid)  # its count is of GEMMs' +0 sums on a -0 acc: p is no GEMM's sum
    return True


def _fold_kernel(grid: Grid) -> ChunkFold | None:
    """The registered fold kernel where it serves ``grid`` here (a build failure is warned about
    once), else None."""
    load_plugins("torch")
    if not _CHUNK_FOLD:
        return None
    kernel = _CHUNK_FOLD[0]
    served = run_or_fall_back(_FAILED, "chunk fold", lambda: kernel.serves(grid), lambda: False,
                              "the chunk fold's CPU kernel (codegen/chunk_fold_cpu.py)")
    return kernel if served else None


def _fix_zero_signs(partial, acc, comp, a, b):
    """A GEMM sums from +0, so products that are all -0 sum to +0, not IEEE's -0; that differs
    only where acc (or comp) is -0, which is rare: those sums are redone from their products."""
    risky = (partial == 0) & (torch.signbit(acc) | (False if comp is None else torch.signbit(comp)))
    if not risky.any():
        return partial
    i, m, n = risky.nonzero(as_tuple=True)
    p = a[i, m, :] * b[i, :, n]
    partial[i, m, n] = torch.where(((p == 0) & torch.signbit(p)).all(-1), -0.0, partial[i, m, n])
    return partial


def _pairwise(plan: _Plan, a, b, index, seed):
    """A tree of rounded adds over the products, in row blocks that bound the memory.
    A single product is added to +0 once (step 0), so that it too ends in the acc format."""
    B, M, K = a.shape
    N = b.shape[-1]
    out = torch.zeros(B, M, N, dtype=torch.float64, device=a.device)
    if K == 0:
        return out
    rows = max(1, _EAGER_ELEMS // max(1, B * N * K))
    mul_seeds = _step_seeds(seed, 1, range(K), a.device)
    for m0 in range(0, M, rows):
        idx = None if index is None else index[:, m0:m0 + rows, :, None]
        terms = _product(plan, a[:, m0:m0 + rows, None, :], b.transpose(1, 2)[:, None], idx,
                         None if mul_seeds is None else mul_seeds[0])
        if K == 1:
            terms = torch.cat([torch.zeros_like(terms), terms], -1)
        level = 0
        while terms.shape[-1] > 1:
            n = terms.shape[-1]
            pairs = n // 2
            seeds = _step_seeds(seed, 2, range(K * level, K * level + pairs), a.device)
            summed, _ = _accumulate(plan, terms[..., 0:2 * pairs:2], None, terms[..., 1:2 * pairs:2], idx, seeds)
            terms = torch.cat([summed, terms[..., n - 1:]], -1) if n % 2 else summed
            level += 1
        out[:, m0:m0 + rows] = terms[..., 0]
    return out
