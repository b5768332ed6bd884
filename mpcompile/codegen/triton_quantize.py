"""The Triton quantize kernel: one fused pass over memory per call, bit-identical to the reference.

A call reads x once and writes the result once. Everything between happens in registers:
the rounding (``triton_round``), the random words of seeded stochastic rounding (recomputed
from each element's flat index as ``counter_bits`` makes them, never read from memory) and,
for block formats, each block's largest magnitude and shared scale. Kernels are specialised
per ``RoundSpec`` (the plan's flags and the format's numbers, all constexpr); the launch
closure is cached in memory per (plan, spec), and Triton caches the compiled code on disk.
Float32 plans only: a float64 plan goes to the reference.

Registered as the ``triton`` quantize kernel, which the ``triton`` backend runs (``auto`` picks
that backend for CUDA tensors); ``mpcompile.backends.load_plugins`` imports this module the first
time the ``triton`` backend is resolved. On the CPU it runs only when asked for by name
(``backend="triton"``, ``use_backend`` or ``set_quantize_kernel("triton")``), in Triton's
interpreter (``TRITON_INTERPRET=1`` set before mpcompile is imported): that is how the tests
check it against the reference. A kernel that fails to compile falls back to the reference,
with one warning per spec.
"""
from __future__ import annotations

import math
import struct
from typing import Callable

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ..backends import BackendError, run_or_fall_back
from ..rounding import QuantParams, QuantPlan, reference_quantize, register_quantize_kernel
from .round_spec import RoundSpec, round_spec
from .triton_round import counter_word, round_blocks, round_to_format

__all__ = ["triton_quantize", "INTERPRETED", "ELEMENTS_PER_PROGRAM", "cached_launchers"]

Launcher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
_LAUNCHERS: dict[tuple[QuantPlan, RoundSpec], Launcher] = {}
_FAILED: set[tuple[QuantPlan, RoundSpec]] = set()


@triton.jit
def _random_words(bits_ptr, offs, mask, BITS: tl.constexpr):
    """The random words of the elements at flat indices ``offs``: recomputed from the seed at
    ``bits_ptr`` ("seeded"), read from the int tensor there ("tensor"), or none ("none")."""
    if BITS == "seeded":
        words = counter_word(offs, tl.load(bits_ptr).to(tl.uint32))
    elif BITS == "tensor":
        words = tl.load(bits_ptr + offs, mask=mask, other=0)
    else:
        words = 0
    return words


@triton.jit
def _quantize_values(x_ptr, out_ptr, bits_ptr, numel, SPEC: tl.constexpr, BITS: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Elementwise formats: BLOCK contiguous elements per program."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = round_to_format(x, _random_words(bits_ptr, offs, mask, BITS), None, SPEC)
    tl.store(out_ptr + offs, y, mask=mask)


@triton.jit
def _quantize_blocks(x_ptr, out_ptr, bits_ptr, n_blocks, length, inner, blocks_per_line, SPEC: tl.constexpr,
                     BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, WIDTH: tl.constexpr, ROWS: tl.constexpr,
                     RUN: tl.constexpr):
    """Block formats on a contiguous x viewed as (outer, length, inner), blocks of BLOCK_SIZE
    along ``length``: ROWS blocks per program, one per row of a (ROWS, WIDTH) tile.

    Block ids run fastest over ``inner``, so the rows of a tile are neighbours in memory and
    loads stay coalesced whichever axis the blocks follow; no transposed or padded copy is made.
    ``RUN``: inner is 1 and BLOCK_SIZE divides length, so x is one run of whole blocks and a
    block's offset needs no (per row, 64-bit) division.
    """
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, WIDTH)[None, :]
    if RUN:
        offs = block[:, None] * BLOCK_SIZE + cols
        mask = (block[:, None] < n_blocks) & (cols < BLOCK_SIZE)
    else:
        i = block % inner
        line = block // inner
        j = (line % blocks_per_line)[:, None] * BLOCK_SIZE + cols
        offs = ((line // blocks_per_line)[:, None] * length + j) * inner + i[:, None]
        mask = (block[:, None] < n_blocks) & (cols < BLOCK_SIZE) & (j < length)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = round_blocks(x, _random_words(bits_ptr, offs, mask, BITS), SPEC)
    tl.store(out_ptr + offs, y, mask=mask)


INTERPRETED: bool = isinstance(_quantize_values, InterpretedFunction)
# the interpreter pays ~1.6 ms per program whatever its size; a GPU wants many small programs
ELEMENTS_PER_PROGRAM: int = 4096 if INTERPRETED else 1024


def cached_launchers() -> int:
    """How many (plan, spec) launchers this process has built."""
    return len(_LAUNCHERS)


def triton_quantize(x: torch.Tensor, plan: QuantPlan, params: QuantParams, bits: torch.Tensor | None) -> torch.Tensor:
    """``reference_quantize`` as a Triton kernel: same contract, bit-identical results.

    Args:
        x: the values, in ``plan.dtype``; a float64 plan is passed to the reference.
        plan: from ``plan_quantize``.
        params: the plan's per-format numbers.
        bits: for stochastic rounding, an integer tensor of x's shape holding the random bits,
            or (``plan.seeded``) the 0-d seed of ``counter_bits``.

    Raises:
        BackendError: x is on the CPU and Triton's interpreter is off.
        ValueError: stochastic rounding without bits, or bits of another shape.
    """
    if plan.dtype != torch.float32:
        return reference_quantize(x, plan, params, bits)
    if x.device.type == "cpu" and not INTERPRETED:
        raise BackendError(
            "mpcompile: the 'triton' quantize kernel got a CPU tensor, but Triton runs on the CPU only "
            "in its interpreter, which is off. Set TRITON_INTERPRET=1 before importing mpcompile, move "
            "the tensor to a CUDA device, or use set_quantize_kernel('auto') / ('reference').")
    _check_bits(x, plan, bits)
    spec = round_spec(plan, params)
    key = (plan, spec)

    def kernel() -> torch.Tensor:
        xc = x.contiguous()
        out = torch.empty_like(xc)
        if xc.numel():
            launch = _LAUNCHERS.get(key)
            if launch is None:
                launch = _LAUNCHERS[key] = _launcher(plan, spec)
            launch(xc, out, xc if bits is None else bits.contiguous())
        return out

    return run_or_fall_back(_FAILED, key, kernel, lambda: reference_quantize(x, plan, params, bits),
                            f"the Triton quantize kernel for {_describe(plan, spec)}")


def _check_bits(x: torch.Tensor, plan: QuantPlan, bits: torch.Tensor | None) -> None:
    if plan.rounding != "stochastic":
        return
    if bits is None:
        raise ValueError("triton_quantize: stochastic rounding needs random bits or a seed, got None")
    want = () if plan.seeded else tuple(x.shape)
    if tuple(bits.shape) != want or bits.is_floating_point():
        raise ValueError(f"triton_quantize: bits must be an integer tensor of shape {want}, "
                         f"got {bits.dtype} of shape {tuple(bits.shape)}")


def _launcher(plan: QuantPlan, spec: RoundSpec) -> Launcher:
    """The launch of the kernel for one (plan, spec), with its constexprs bound."""
    mode = "none" if plan.rounding != "stochastic" else "seeded" if plan.seeded else "tensor"
    if plan.block_size is None:
        def launch(x: torch.Tensor, out: torch.Tensor, bits: torch.Tensor) -> None:
            n = x.numel()
            grid = (triton.cdiv(n, ELEMENTS_PER_PROGRAM),)
            _quantize_values[grid](x, out, bits, n, SPEC=spec, BITS=mode, BLOCK=ELEMENTS_PER_PROGRAM)
        return launch

    size = plan.block_size
    width = triton.next_power_of_2(size)
    rows = max(1, ELEMENTS_PER_PROGRAM // width)

    def launch_blocks(x: torch.Tensor, out: torch.Tensor, bits: torch.Tensor) -> None:
        shape = x.shape if x.dim() else (1,)
        axis = plan.axis % len(shape)
        length, inner = shape[axis], math.prod(shape[axis + 1:])
        per_line = triton.cdiv(length, size)
        n_blocks = math.prod(shape[:axis]) * per_line * inner
        _quantize_blocks[(triton.cdiv(n_blocks, rows),)](
            x, out, bits, n_blocks, length, inner, per_line,
            SPEC=spec, BITS=mode, BLOCK_SIZE=size, WIDTH=width, ROWS=rows, RUN=inner == 1 and length % size == 0)
    return launch_blocks


def _describe(plan: QuantPlan, spec: RoundSpec) -> str:
    """The format and rounding of a kernel, in words, for messages."""
    f32 = lambda bits: struct.unpack("<f", struct.pack("<i", bits))[0]
    if spec.fixed:
        fmt = f"fixed point (fl={spec.man}, max={f32(spec.max_bits)!r}, min={-f32(spec.neg_max_bits)!r}"
    else:
        fmt = (f"float format (man={spec.man}, emin={spec.emin}, bias={spec.bias}, max={f32(spec.max_bits)!r}, "
               f"inf={spec.has_inf}, subnormals={not spec.ftz}")
    fmt += f", signed={spec.signed})"
    if plan.block_size is not None:
        fmt = f"blocks of {plan.block_size} along axis {plan.axis} of {fmt}"
    return f"{fmt} with rounding={plan.rounding!r}, saturate={plan.saturate}"


def _accepts(x: torch.Tensor, plan: QuantPlan) -> bool:
    return x.is_cuda and plan.dtype == torch.float32


register_quantize_kernel("triton", triton_quantize, _accepts)
