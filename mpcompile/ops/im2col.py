"""Convolution as GEMM: patches (im2col) and the transposed convolution of the input gradient.

The reduction of output element (n, c_out, o) runs over (c_in of its group, kernel position)
in row-major order, padding zeros included, so a convolution's emulated sums are defined by
the patch layout here.
"""
from __future__ import annotations

import math
import threading
from typing import Callable

import torch
import torch.nn.functional as F

from ..backends import load_plugins, run_or_fall_back

__all__ = ["output_sizes", "patches", "conv_as_gemm_operands", "transposed_conv_operands", "phased_size",
           "phased_input", "held_memory", "PatchRows", "register_patch_rows", "PhasedRows", "register_phased_rows"]

# patch_rows(x (N, C, H, W), kernel, stride, padding, dilation, memory) -> (N*Ho*Wo, C*kh*kw) in
# ``memory``: the patches as rows, as ``patches`` reshaped (``codegen.im2col_cpu``)
PatchRows = Callable[..., torch.Tensor]
_PATCH_ROWS: dict[torch.dtype, PatchRows] = {}  # by the input dtypes the kernel takes
# phased_rows(x (N, C, H, W) float32, padding, stride, memory) -> ``phased_input`` in memory (``codegen.im2col_cpu``)
PhasedRows = Callable[..., torch.Tensor]
_PHASED_ROWS: list[PhasedRows] = []
_FAILED: set[str] = set()  # "im2col", "phases" once the CPU kernel failed to build: torch's copy from then on
_HELD = threading.local()  # (slot, dtype) -> this thread's memory (held_memory)


def register_patch_rows(kernel: PatchRows, dtypes: tuple[torch.dtype, ...]) -> None:
    """Lay out the patches of 2-D CPU convolutions of ``dtypes`` with ``kernel`` from now on (a
    plug-in of the torch backend, ``codegen.im2col_cpu``)."""
    _PATCH_ROWS.update(dict.fromkeys(dtypes, kernel))


def register_phased_rows(kernel: PhasedRows) -> None:
    """Lay out ``phased_input`` of float32 CPU inputs with ``kernel`` from now on (``codegen.im2col_cpu``)."""
    _PHASED_ROWS[:] = [kernel]


def output_sizes(sizes, kernel, stride, padding, dilation) -> tuple[int, ...]:
    """A convolution's output size along each spatial dim of input ``sizes`` (< 1 where the
    dilated kernel does not fit the padded input)."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip(sizes, kernel, stride, padding, dilation))


def patches(x: torch.Tensor, kernel: tuple[int, ...], stride, padding, dilation) -> torch.Tensor:
    """(N, C, *S) -> (N, *O, C, *kernel): the window of every output position."""
    nd = len(kernel)
    x = F.pad(x, [p for d in reversed(range(nd)) for p in (padding[d], padding[d])])
    for d in range(nd):
        span = dilation[d] * (kernel[d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])[..., ::dilation[d]]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    return x.permute(perm)


def conv_as_gemm_operands(x, w, stride, padding, dilation, groups):
    """The operands of a grouped convolution as a batched GEMM over groups.

    Returns (A, B, out_shape, to_output) where A is (G, N*L, C_g*K), B is (G, C_g*K, C_out/G),
    and ``to_output`` turns the (G, N*L, C_out/G) product into the (N, C_out, *O) output.
    """
    n, g = x.shape[0], groups
    kernel = tuple(w.shape[2:])
    out_sizes = output_sizes(x.shape[2:], kernel, stride, padding, dilation)
    length, width = math.prod(out_sizes), x.shape[1] * math.prod(kernel)  # output positions; C*K

    def copied() -> torch.Tensor:  # torch's copy of the unfolded view (which refuses a kernel too large)
        return patches(x, kernel, stride, padding, dilation).reshape(n * length, width)

    two_d = x.device.type == "cpu" and x.dim() == 4 and min(out_sizes) > 0
    if two_d:
        load_plugins("torch")
    kernel_rows = _PATCH_ROWS.get(x.dtype) if two_d else None
    if kernel_rows is not None:  # C++ rows: torch's copy moves 3 elements a run
        memory = held_memory(n * length * width, x.dtype)
        rows = run_or_fall_back(_FAILED, "im2col",
                                lambda: kernel_rows(x.contiguous(), kernel, stride, padding, dilation, memory),
                                copied, "the CPU im2col kernel (codegen/im2col_cpu.py)")
    else:
        rows = copied()
    a = rows.view(n * length, g, width // g).transpose(0, 1)  # (G, N*L, C_g*K)
    b = w.reshape(g, w.shape[0] // g, -1).transpose(1, 2)  # (G, C_g*K, C_out/G)
    out_shape = (n, w.shape[0], *out_sizes)

    def to_output(y: torch.Tensor) -> torch.Tensor:
        y = y.reshape(g, n, length, w.shape[0] // g).permute(1, 0, 3, 2)  # (N, G, C_out/G, L)
        return y.reshape(out_shape)

    return a, b, out_shape, to_output


def phased_size(h: int, w: int, padding, stride) -> tuple[int, int]:
    """(Hp, Wq) of ``phased_input``: the padded height, and the columns of a row's phase."""
    return h + 2 * padding[0], -(-(w + 2 * padding[1]) // stride[1])


def phased_input(x: torch.Tensor, padding, stride, dtype: torch.dtype, slot: str) -> torch.Tensor:
    """x (N, C, H, W) zero-padded, each row's columns split into ``stride[1]`` phases, as flat
    ``dtype`` with 8 zeros after it, in ``held_memory(..., slot)``: padded element (n, c, y, X) at
    ``((n * C + c) * Hp + y) * sw * Wq + (X % sw) * Wq + X // sw`` (Wq = ceil(Wp / sw)), so that
    the inputs of output columns ow, ow + 1, ... under one kernel element are consecutive."""
    load_plugins("torch")
    n, c, h, w = x.shape
    (ph, pw), sw = padding, stride[1]
    hp, wq = phased_size(h, w, padding, stride)
    memory = held_memory(n * c * hp * sw * wq + 8, dtype, slot)

    def copied() -> torch.Tensor:
        padded = F.pad(x, (pw, wq * sw - w - pw, ph, ph))
        memory[:-8].view(n, c, hp, sw, wq).copy_(padded.view(n, c, hp, wq, sw).transpose(-1, -2))
        memory[-8:] = 0
        return memory

    if not (_PHASED_ROWS and x.device.type == "cpu" and x.dtype == torch.float32):
        return copied()
    return run_or_fall_back(_FAILED, "phases", lambda: _PHASED_ROWS[0](x.contiguous(), padding, stride, memory),
                            copied, "the CPU kernel of a convolution's padded input (codegen/im2col_cpu.py)")


def held_memory(numel: int, dtype: torch.dtype, slot: str = "patches") -> torch.Tensor:
    """This thread's memory for an op's CPU operand layouts and rounded operands (``slot``: one
    per operand alive at once), kept from call to call: patches are several times a convolution's
    input (tens of MB), which fresh memory faults in page by page at every call. An operand laid
    out here is dead once its GEMM has run, before the next op lays out its own: each op builds
    its operands and runs its GEMM before returning, on one thread. Kept per dtype too: a model whose
    convolutions alternate exact products (float64 scalars) and rounded ones (float32) would
    otherwise lay out each in fresh memory."""
    memory = _HELD.__dict__
    held = memory.get((slot, dtype))
    if held is None or held.numel() < numel:
        held = memory[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return held[:numel]


def transposed_conv_operands(grad, w, input_shape, stride, padding, dilation, groups):
    """grad_input of a convolution as a stride-1 convolution (arguments for
    ``conv_as_gemm_operands``): grad upsampled by the stride with zeros, padded so that the
    result has the input's size, against the kernel flipped and with in/out channels swapped."""
    nd = len(stride)
    kernel = w.shape[2:]
    up_shape = [grad.shape[0], grad.shape[1]] + [(grad.shape[2 + d] - 1) * stride[d] + 1 for d in range(nd)]
    up = grad.new_zeros(up_shape)
    up[(slice(None), slice(None), *(slice(None, None, s) for s in stride))] = grad
    pads = []
    for d in reversed(range(nd)):
        left = dilation[d] * (kernel[d] - 1) - padding[d]
        right = input_shape[2 + d] - up_shape[2 + d] - left + dilation[d] * (kernel[d] - 1)
        pads += [left, right]
    up = F.pad(up, pads)  # negative pads crop
    g = groups
    c_out, c_g = w.shape[0], w.shape[1]
    wt = w.reshape(g, c_out // g, c_g, *kernel).transpose(1, 2).reshape(g * c_g, c_out // g, *kernel)
    wt = wt.flip(list(range(2, 2 + nd)))
    ones = (1,) * nd
    return up, wt, ones, (0,) * nd, tuple(dilation)
