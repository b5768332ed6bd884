"""Emulated 2-D convolutions as implicit GEMMs: no patches, the kernel reads the input at offsets.

A convolution's emulated GEMM over patches (``im2col``) copies its input nine times for a 3x3
kernel, and that copy cost as much as the GEMM. Here the GEMM's operands are read in place, as
``ChunkFold.offsets`` takes them: a copy of the padded input whose columns are split by the
stride into phases (so that the inputs of consecutive output columns are consecutive in memory),
the other operand, and a table of offsets per reduction step. The vector side (8 output columns,
or 8 output channels of the weight gradient) is float32, the scalar side float64 for exact
products and float32 for rounded ones (``_scalars``). The reduction
runs over the same (c, i, j) (forward) or (n, oh, ow) (weight gradient) in the same order as over
patches, so the sums are the same, bit for bit.

Served: float32 operands (exact products in float64, rounded where a ``mul`` format says) on
the CPU, ``groups == 1``, the orders and roundings ``emulate.offsets_kernel`` takes (nearest, no
Kahan, not pairwise). Elsewhere these return None and the caller lays out patches.
"""
from __future__ import annotations

import torch

from ..profiling import section
from .emulate import offsets_kernel, products_overflow
from .gemm_backends import has_gemm_backend
from .im2col import held_memory, output_sizes, phased_input, phased_size
from .spec import ArithSpec

__all__ = ["serves", "conv_sums", "weight_grad_sums"]

_LANES = 8  # output elements per vector of the kernel


def serves(spec: ArithSpec, x: torch.Tensor, other: torch.Tensor, groups: int) -> bool:
    """Whether ``conv_sums`` and ``weight_grad_sums`` compute a convolution of ``x`` here (``other``:
    the weight or the gradient)."""
    return _served(spec, x, other, groups) is not None


def _served(spec: ArithSpec, x: torch.Tensor, other: torch.Tensor, groups: int):
    if not (groups == 1 and x.dim() == 4 and x.dtype == other.dtype == torch.float32 and x.device.type == "cpu"
            and not has_gemm_backend(x.device)):
        return None
    return offsets_kernel(spec, x.dtype, x.device)


def _scalars(spec: ArithSpec) -> torch.dtype:
    """The scalar side's dtype: float32 where products are rounded (the kernel forms them in float32
    lanes where the format fits, and converts for the others), float64 for exact products."""
    return torch.float64 if spec.mul is None else torch.float32


def _with_slack(t: torch.Tensor, dtype: torch.dtype, slot: str) -> torch.Tensor:
    """``t`` as flat ``dtype`` in ``held_memory(..., slot)``, with 8 zeros after it (the lanes a
    last vector reads past its end)."""
    flat = held_memory(t.numel() + _LANES, dtype, slot)
    flat[:-_LANES].view(t.shape).copy_(t)
    flat[-_LANES:] = 0
    return flat


class _PhasedInput:
    """``im2col.phased_input`` of x and the offsets of output positions and kernel elements in it."""

    def __init__(self, x: torch.Tensor, padding, stride, dtype: torch.dtype, slot: str):
        self.values = phased_input(x, padding, stride, dtype, slot)
        (self.sh, self.sw), self.c = stride, x.shape[1]
        self.hp, self.wq = phased_size(*x.shape[2:], padding, stride)

    def positions(self, n: int, ho: int, ow: torch.Tensor) -> torch.Tensor:
        """Offsets of output positions (n, oh, ow) for every n, oh and the given ow: (n, ho, len(ow))."""
        row = self.sw * self.wq
        sample = torch.arange(n).view(n, 1, 1) * (self.c * self.hp * row)
        return sample + torch.arange(ho).view(1, ho, 1) * (self.sh * row) + ow.view(1, 1, -1)

    def kernel_steps(self, kernel, dilation) -> torch.Tensor:
        """Offsets of kernel elements (c, i, j), in that (row-major) order: (C * kh * kw,)."""
        (kh, kw), (dh, dw) = kernel, dilation
        row = self.sw * self.wq
        cols = torch.arange(kw) * dw
        within = (cols % self.sw) * self.wq + cols // self.sw
        steps = (torch.arange(self.c).view(-1, 1, 1) * (self.hp * row) + torch.arange(kh).view(1, -1, 1) * (dh * row)
                 + within.view(1, 1, -1))
        return steps.reshape(-1)


def conv_sums(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int,
              spec: ArithSpec) -> torch.Tensor | None:
    """The emulated convolution of ``x`` (N, C, H, W) and ``w`` (C_out, C, kh, kw) without bias:
    float64 (N, C_out, Ho, Wo) holding acc values, as ``emulated_matmul`` over patches gives it;
    None where not served."""
    kernel = _served(spec, x, w, groups)
    if kernel is None:
        return None
    ho, wo = output_sizes(x.shape[2:], w.shape[2:], stride, padding, dilation)
    if ho < 1 or wo < 1:
        return None
    n, c_out = x.shape[0], w.shape[0]
    with section("im2col"):
        phased = _PhasedInput(x, padding, stride, torch.float32, "vectors")
        steps = phased.kernel_steps(w.shape[2:], dilation)
        # (C * kh * kw, C_out): a step's scalars side by side
        weight = _with_slack(w.reshape(c_out, -1).t(), _scalars(spec), "scalars")
    starts = torch.arange(0, wo, _LANES)  # vectors: _LANES output columns of a row (n, oh) each
    vectors = torch.stack([phased.positions(n, ho, starts),
                           (torch.arange(n).view(n, 1, 1) * (c_out * ho * wo) + torch.arange(ho).view(1, ho, 1) * wo
                            + starts).expand(n, ho, -1),
                           (wo - starts).clamp(max=_LANES).expand(n, ho, -1)], dim=-1).reshape(-1, 3)
    channels = torch.arange(c_out)
    out = torch.empty(n, c_out, ho, wo, dtype=torch.float64)
    with section("fused gemm"):
        kernel(out, phased.values, weight, steps, torch.arange(steps.numel()) * c_out, vectors,
               torch.stack([channels, channels * (ho * wo)], dim=-1), overflow=products_overflow(spec, x, w))
    return out


def weight_grad_sums(g: torch.Tensor, x: torch.Tensor, w_shape, stride, padding, dilation, groups: int,
                     spec: ArithSpec) -> torch.Tensor | None:
    """The emulated weight gradient of a convolution: grad_output ``g`` (N, C_out, Ho, Wo) against
    the patches of ``x`` (N, C, H, W), summed over (n, oh, ow) in that order: float64 ``w_shape``
    holding acc values, as ``emulated_matmul`` of ``channel_rows(g)`` and the patches gives it;
    None where not served."""
    kernel = _served(spec, x, g, groups)
    if kernel is None:
        return None
    n, c_out, ho, wo = g.shape
    with section("im2col"):
        phased = _PhasedInput(x, padding, stride, _scalars(spec), "scalars")
        # (N, Ho, Wo, C_out): a position's vectors side by side
        grad = _with_slack(g.permute(0, 2, 3, 1), torch.float32, "vectors")
    starts = torch.arange(0, c_out, _LANES)  # vectors: _LANES output channels each
    k_steps = phased.kernel_steps(w_shape[2:], dilation)
    positions = phased.positions(n, ho, torch.arange(wo)).reshape(-1)
    out = torch.empty(k_steps.numel(), c_out, dtype=torch.float64)
    with section("fused gemm"):
        kernel(out, grad, phased.values, torch.arange(positions.numel()) * c_out, positions,
               torch.stack([starts, starts, (c_out - starts).clamp(max=_LANES)], dim=-1),
               torch.stack([k_steps, torch.arange(k_steps.numel()) * c_out], dim=-1),
               overflow=products_overflow(spec, g, x))
    return out.t().reshape(w_shape)
