"""Transposed convolutions (``F.conv_transpose1d/2d/3d``) with per-role formats and emulated
arithmetic.

A transposed convolution of x (N, C_in, *S) with w (C_in, C_out / groups, *k) is the input
gradient of the convolution with that weight: the same GEMMs a convolution's grad_input runs
(``im2col.transposed_conv_operands``), so its sums are defined as that one's:

- Roles: ``input`` = x (channel axis 1), ``weight`` = w as given (channel axis 1, its output
  channels within a group, as torch.ao quantizes a transposed convolution's weight; bits of
  stochastic rounding by w's flat index), ``bias`` (C_out,), ``output`` and ``grad_output``
  (axis 1), ``grad_input`` (x's gradient, axis 1), ``grad_weight`` (w's layout, axis 1),
  ``grad_bias``. Block formats' blocks run along the reduction: a weight's (C_in, *k) in w's
  own order, the channels of x, the output and the gradients.
- Forward: x is upsampled by the stride with zeros, padded by dilation * (k - 1) - padding on
  the left and so that the output has torch's size on the right (output_padding included), and
  convolved with stride 1 with the kernel flipped and its in/out channels swapped. Each output
  element (n, c_out, o) is one dot product over (input channel of its group, kernel position),
  row-major, the zeros of the upsampling and padding included, in the forward spec; random bits
  of stochastic products and sums are numbered by the output element's flat index in
  (N, C_out, *O), with the op's forward sub-seed (``op_seed(seed, 0)``). The bias is one more
  rounded add into the accumulator (the exact sum rounded once), as a convolution adds it.
- Backward, in the backward spec: grad_input is the ordinary convolution of grad_output with w
  (same stride, padding, dilation, groups: a dot product over (output channel of the group,
  kernel position) per element, random bits numbered by x's flat index, ``op_seed(seed, 1)``);
  grad_weight reduces x against grad_output's patches over (batch, input position), row-major
  (numbered by w's flat index, ``op_seed(seed, 2)``); grad_bias sums grad_output over (batch,
  output position) (``op_seed(seed, 3)``), as a convolution's bias gradient.

With fp32 specs and no formats the op is torch's, forward and backward, to the bit.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..backends import check_backend, use_backend
from .api import Formats, Spec, check_operands, delayed_role_scales, fx_leaf, int_tuple, prepare_op
from .bodies import (RoleTensor, add_bias, backward_gemm, channel_rows, conv_index, emulated, kernel_dims,
                     round_role, sum_rows)
from .im2col import conv_as_gemm_operands, transposed_conv_operands
from .library import backward_scales, dense, gradients, inputs_of, mpc_op, save_gemm, seed_value
from .roles import op_seed
from .spec import ArithSpec, RoleFormats, parse_arith, parse_roles

__all__ = ["conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "conv_transpose_forward",
           "conv_transpose_backward", "conv_transpose_shape"]

_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_transpose_shape(x_shape, w_shape, stride, padding, output_padding, groups, dilation) -> tuple[int, ...]:
    """The output shape (N, C_out, *O) of a transposed convolution, as torch computes it."""
    sizes = [(s - 1) * st - 2 * p + d * (k - 1) + op + 1
             for s, k, st, p, op, d in zip(x_shape[2:], w_shape[2:], stride, padding, output_padding, dilation)]
    return (x_shape[0], w_shape[1] * groups, *sizes)


def _kd(w: torch.Tensor) -> tuple[int, ...]:
    """The weight's (in_channels, out_channels/groups, *kernel) reduction dims: in_channels and
    the kernel elements, in the im2col order of the convolution it is the input gradient of."""
    return (0, *kernel_dims(w, 2))


# -- body -----------------------------------------------------------------------------------------
def conv_transpose_forward(x, w, b, stride, padding, output_padding, groups, dilation, roles: RoleFormats,
                           fwd: ArithSpec, seed: int | None, scales=None) -> torch.Tensor:
    """The transposed convolution of x with w (and bias b), as the module docstring says."""
    nd = w.dim() - 2
    xq, wq = round_role(roles, "input", x, 1, seed, scales, (1,)), round_role(roles, "weight", w, 1, seed, scales, _kd(w))
    bq = round_role(roles, "bias", b, 0, seed, scales)
    if fwd.is_native:
        y = _CONV_T[nd](xq, wq, bq, stride, padding, output_padding, groups, dilation)
    else:
        out = conv_transpose_shape(x.shape, w.shape, stride, padding, output_padding, groups, dilation)
        # the input gradient of a convolution whose input has the output's shape: its GEMM
        a, bm, shape, to_output = conv_as_gemm_operands(
            *transposed_conv_operands(xq, wq, out, stride, padding, dilation, groups), groups)
        y = to_output(emulated(a, bm, fwd, op_seed(seed, 0), (roles.get("input"), roles.get("weight")),
                               index=conv_index(fwd, a, shape, groups)))
        if bq is not None:
            y = add_bias(y, bq.reshape((1, -1) + (1,) * nd), fwd, op_seed(seed, 0))
        y = y.to(x.dtype)
    return round_role(roles, "output", y, 1, seed, scales, (1,))


def _padded_grad(g: torch.Tensor, padding, output_padding) -> torch.Tensor:
    """grad_output padded so that the convolution with w (stride and dilation of the op, padding
    0) has exactly x's size: ``padding`` zeros on the left, ``padding - output_padding`` on the
    right (a negative pad crops the output_padding rows, which no window reads)."""
    pads = [p for d in reversed(range(len(padding))) for p in (padding[d], padding[d] - output_padding[d])]
    return F.pad(g, pads) if any(pads) else g


def conv_transpose_backward(grad, x, w, has_bias: bool, stride, padding, output_padding, groups, dilation,
                            roles: RoleFormats, fwd: ArithSpec, bwd: ArithSpec, seed: int | None, scales=None):
    """(grad x, grad w, grad bias or None) of ``conv_transpose_forward``, as the module docstring says."""
    nd = w.dim() - 2
    g, xs, ws = (RoleTensor(roles, "grad_output", grad, 1, seed, scales, (1,)),
                 RoleTensor(roles, "input", x, 1, seed, scales, (1,)), RoleTensor(roles, "weight", w, 1, seed, scales, _kd(w)))
    if bwd.is_native:  # the kernel torch's autograd calls for a transposed convolution
        gx, gw, gb = torch.ops.aten.convolution_backward(g.rounded, xs.rounded, ws.rounded,
                                                         [grad.shape[1]] if has_bias else None, stride, padding,
                                                         dilation, True, output_padding, groups,
                                                         [True, True, has_bias])
    else:
        c_out = grad.shape[1]
        gb = sum_rows(g.rounded.transpose(0, 1).reshape(c_out, -1).t(), bwd, op_seed(seed, 3)) if has_bias else None
        fit = lambda gt: _padded_grad(gt, padding, output_padding)
        unit = [0] * nd

        def gx_operands(gt, wt):  # grad_input: the convolution of grad_output with w
            a, b, x_shape, to_input = conv_as_gemm_operands(fit(gt), wt, stride, unit, dilation, groups)
            return a, b, to_input, conv_index(bwd, a, x_shape, groups)

        def gw_operands(xt, gt):  # grad_weight: the input's rows against grad_output's patches
            patches = conv_as_gemm_operands(fit(gt), w, stride, unit, dilation, groups)[0]
            return channel_rows(xt, groups), patches, lambda y: y.reshape(w.shape), None

        # the unfolded and permuted operands are not laid out as their role tensors, and hold padding zeros
        gx = backward_gemm(g, ws, gx_operands, bwd, op_seed(seed, 1), "grad_input", 1, plain=(False, False, False),
                           padded=(True, False), out_blocks=(1,))
        gw = backward_gemm(xs, g, gw_operands, bwd, op_seed(seed, 2), "grad_weight", 1, plain=(False, False, True),
                           padded=(False, True), out_blocks=_kd(w))
        return gx, gw, round_role(roles, "grad_bias", gb, 0, seed, scales)
    return (round_role(roles, "grad_input", gx, 1, seed, scales, (1,)),
            round_role(roles, "grad_weight", gw, 1, seed, scales, _kd(w)),
            round_role(roles, "grad_bias", gb, 0, seed, scales))


# -- mpc:: ops --------------------------------------------------------------------------------------
@mpc_op("conv_transpose")
def conv_transpose(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: list[int],
                   padding: list[int], output_padding: list[int], groups: int, dilation: list[int], roles: str,
                   fwd: str, bwd: str, seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                   history: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """conv_transpose1d/2d/3d (by w's rank) with per-role formats and the forward arithmetic ``fwd``."""
    with use_backend(backend):
        y = conv_transpose_forward(x, w, b, stride, padding, output_padding, groups, dilation, parse_roles(roles),
                                   parse_arith(fwd), seed_value(seed), scales)
    return y.contiguous()


@conv_transpose.register_fake
def _(x, w, b, stride, padding, output_padding, groups, dilation, roles, fwd, bwd, seed, scales=None, history=None,
      backend="auto"):
    return x.new_empty(_CONV_T[w.dim() - 2](x, w, b, stride, padding, output_padding, groups, dilation).shape)


@mpc_op("conv_transpose_backward")
def conv_transpose_backward_op(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, has_bias: bool,
                               stride: list[int], padding: list[int], output_padding: list[int], groups: int,
                               dilation: list[int], roles: str, fwd: str, bwd: str, seed: Optional[torch.Tensor],
                               scales: Optional[torch.Tensor] = None,
                               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with use_backend(backend):
        gx, gw, gb = conv_transpose_backward(grad, x, w, has_bias, stride, padding, output_padding, groups, dilation,
                                             parse_roles(roles), parse_arith(fwd), parse_arith(bwd), seed_value(seed),
                                             scales)
    return dense(gx, gw, gb, w)


@conv_transpose_backward_op.register_fake
def _(grad, x, w, has_bias, stride, padding, output_padding, groups, dilation, roles, fwd, bwd, seed, scales=None,
      backend="auto"):
    return x.new_empty(x.shape), w.new_empty(w.shape), w.new_empty(grad.shape[1] if has_bias else 0)


def _setup(ctx, inputs, output):
    args = inputs_of(conv_transpose, inputs)
    save_gemm(ctx, args, "x", "w")
    ctx.has_bias = args.b is not None
    ctx.conv = (args.stride, args.padding, args.output_padding, args.groups, args.dilation)


def _backward(ctx, grad):
    x, w, seed = ctx.saved_tensors
    gx, gw, gb = torch.ops.mpc.conv_transpose_backward(grad, x, w, ctx.has_bias, *ctx.conv, ctx.roles, ctx.fwd,
                                                       ctx.bwd, seed, backward_scales(ctx, grad), ctx.backend)
    return gradients(conv_transpose, x=gx, w=gw, b=gb if ctx.has_bias else None)


conv_transpose.register_autograd(_backward, setup_context=_setup)


# -- entry points -----------------------------------------------------------------------------------
def _conv_transpose(n: int, x, w, b, stride, padding, output_padding, groups, dilation, formats, forward, backward,
                    seed, amax_history, backend) -> torch.Tensor:
    name = f"conv_transpose{n}d"
    check_operands(name, x=x, w=w, b=b)
    if not isinstance(groups, int) or groups < 1 or x.dim() != n + 2 or w.dim() != n + 2 \
            or x.shape[1] != w.shape[0] or w.shape[0] % groups \
            or (b is not None and tuple(b.shape) != (w.shape[1] * groups,)):
        raise ValueError(f"mpcompile.ops.{name}: x {tuple(x.shape)}, w {tuple(w.shape)}"
                         f"{'' if b is None else f', b {tuple(b.shape)}'} with groups={groups} do not fit: x must be "
                         f"(N, C_in, *{n} sizes), w (C_in, C_out / groups, *kernel) with C_in divisible by groups, "
                         f"b (C_out,)")
    stride, padding, output_padding, dilation = (int_tuple(v, n, what, name) for v, what in (
        (stride, "stride"), (padding, "padding"), (output_padding, "output_padding"), (dilation, "dilation")))
    if any(s < 1 for s in stride + dilation) or any(p < 0 for p in padding + output_padding):
        raise ValueError(f"mpcompile.ops.{name}: stride {stride} and dilation {dilation} must be positive, padding "
                         f"{padding} and output_padding {output_padding} not negative")
    if any(op >= max(s, d) for op, s, d in zip(output_padding, stride, dilation)):
        raise ValueError(f"mpcompile.ops.{name}: output_padding {output_padding} must be smaller than the stride "
                         f"{stride} or the dilation {dilation} (as in torch)")
    shape = conv_transpose_shape(x.shape, w.shape, stride, padding, output_padding, groups, dilation)
    if any(s < 1 for s in shape[2:]):
        raise ValueError(f"mpcompile.ops.{name}: the output size {list(shape[2:])} is not positive")
    roles, fwd, bwd, s = prepare_op(name, formats, forward, backward, seed, x=x, w=w, b=b)
    scales = delayed_role_scales(roles, amax_history, x, w)
    return torch.ops.mpc.conv_transpose(x, w, b, stride, padding, output_padding, groups, dilation, roles, fwd, bwd, s,
                                        scales, amax_history, check_backend(backend))


@fx_leaf
def conv_transpose1d(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     formats: Formats = None, forward: Spec = None, backward: Spec = None, seed: int | None = None,
                     amax_history: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``F.conv_transpose1d`` with per-role formats and emulated arithmetic (see ``conv_transpose2d``)."""
    return _conv_transpose(1, x, w, b, stride, padding, output_padding, groups, dilation, formats, forward, backward,
                           seed, amax_history, backend)


@fx_leaf
def conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     formats: Formats = None, forward: Spec = None, backward: Spec = None, seed: int | None = None,
                     amax_history: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``F.conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation)`` with
    per-role formats and emulated arithmetic.

    Each output element is a dot product over (input channel of its group, kernel position of
    the flipped kernel) of the zero-upsampled, padded input, row-major, zeros included: the input
    gradient of a convolution. grad_input is the ordinary convolution of grad_output with w,
    grad_weight reduces over (batch, input position). Roles and random bits: the module
    docstring. formats, forward, backward, seed, amax_history, backend: as ``conv2d``'s.
    """
    return _conv_transpose(2, x, w, b, stride, padding, output_padding, groups, dilation, formats, forward, backward,
                           seed, amax_history, backend)


@fx_leaf
def conv_transpose3d(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     formats: Formats = None, forward: Spec = None, backward: Spec = None, seed: int | None = None,
                     amax_history: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``F.conv_transpose3d`` with per-role formats and emulated arithmetic (see ``conv_transpose2d``)."""
    return _conv_transpose(3, x, w, b, stride, padding, output_padding, groups, dilation, formats, forward, backward,
                           seed, amax_history, backend)
