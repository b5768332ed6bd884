"""The ``mpc::`` custom ops: one graph node each, with fake implementations and autograd.

Every output is contiguous, as the fake implementations say (compiled graphs rely on it).

Formats and arithmetic travel as the canonical strings of ``spec`` (readable in a printed
graph, parsed once and cached). ``seed`` is an optional int64 0-d tensor: present when some
rounding is stochastic, so that backward re-quantizes the operands with the same bits and
derives its own from it. ``scales`` (float64, one per role of ``spec.ROLES``) carries the
factors of ``tensor_delayed`` roles; ``history`` is the op's amax-history buffer, which only the
backward formula touches: it takes grad_output's scale from it and records grad_output's amax.

``backend`` (last, ``mpcompile.backends``) says which implementation computes the op; the
backward op gets the forward's.

``linear_recompute``, ``matmul_recompute`` and ``conv_recompute`` take a ``Recompute`` string
(``high``) and the consumer activation's name (``phi``, "" for none) on top, and return the
output and the number of its components computed in the low (forward) arithmetic. Their
backward is the plain op's.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..backends import use_backend
from . import kernels
from .roles import delayed_scale, quantize_role, record_amax
from .spec import ROLES, parse_arith, parse_quant, parse_recompute, parse_roles

__all__ = ["delayed_scales", "quant", "linear", "matmul", "conv", "linear_recompute", "matmul_recompute", "conv_recompute",
           "reduce_sum", "reduce_mean"]


def _seed(seed: Optional[torch.Tensor]) -> int | None:
    return None if seed is None else int(seed)


def _grad_seed(seed: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if seed is None else seed ^ 0x2545F491  # another word: the gradient's own bits


_GRAD_OUTPUT = ROLES.index("grad_output")


def _history_setup(ctx, scales: Optional[torch.Tensor], history: Optional[torch.Tensor]) -> None:
    ctx.scales, ctx.history = scales, history


def _backward_scales(ctx, grad: torch.Tensor) -> Optional[torch.Tensor]:
    """The forward's scales, plus grad_output's from the history when it is tensor_delayed."""
    spec = parse_roles(ctx.roles).get("grad_output")
    if ctx.history is None or spec is None or spec.scaling != "tensor_delayed":
        return ctx.scales
    scales = grad.new_ones(len(ROLES), dtype=torch.float64) if ctx.scales is None else ctx.scales.clone()
    scales[_GRAD_OUTPUT] = delayed_scale(spec, ctx.history[_GRAD_OUTPUT], grad)
    record_amax(ctx.history[_GRAD_OUTPUT], grad)
    return scales


# -- delayed scales -------------------------------------------------------------------------------
@torch.library.custom_op("mpc::delayed_scales", mutates_args=("history",))
def delayed_scales(history: torch.Tensor, roles: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The factors (float64, one per role of ``ROLES``, 1 where not delayed) of the ``tensor_delayed``
    input (x) and weight (w) roles, from ``history``, whose rows then take x's and w's amaxes.
    An op of its own so that compiled graphs keep the history update opaque and in order."""
    specs = parse_roles(roles)
    scales = history.new_ones(len(ROLES), dtype=torch.float64)
    for role, t in (("input", x), ("weight", w)):
        spec, i = specs.get(role), ROLES.index(role)
        if spec is not None and spec.scaling == "tensor_delayed":
            scales[i] = delayed_scale(spec, history[i], t)
            record_amax(history[i], t)
    return scales


@delayed_scales.register_fake
def _(history, roles, x, w):
    return history.new_empty(len(ROLES), dtype=torch.float64)


# -- quant ----------------------------------------------------------------------------------------
@torch.library.custom_op("mpc::quant", mutates_args=())
def quant(x: torch.Tensor, fmt: str, grad_fmt: str, axis: int, seed: Optional[torch.Tensor],
          backend: str = "auto") -> torch.Tensor:
    """x rounded to ``fmt`` (a QuantSpec string; "" = unchanged); the gradient to ``grad_fmt``."""
    with use_backend(backend):
        y = quantize_role(x, parse_quant(fmt) if fmt else None, axis=axis, seed=_seed(seed))
    return y.clone(memory_format=torch.contiguous_format)  # never an alias of x


@quant.register_fake
def _(x, fmt, grad_fmt, axis, seed, backend="auto"):
    return x.new_empty(x.shape)


def _quant_setup(ctx, inputs, output):
    ctx.grad_fmt, ctx.axis, ctx.seed, ctx.backend = inputs[2], inputs[3], inputs[4], inputs[5]


def _quant_backward(ctx, grad):
    seed = _grad_seed(ctx.seed)
    return torch.ops.mpc.quant(grad, ctx.grad_fmt, "", ctx.axis, seed, ctx.backend), None, None, None, None, None


quant.register_autograd(_quant_backward, setup_context=_quant_setup)


# -- linear ---------------------------------------------------------------------------------------
@torch.library.custom_op("mpc::linear", mutates_args=())
def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], roles: str, fwd: str, bwd: str,
           seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
           history: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """y = x W^T + b with per-role formats and the forward arithmetic ``fwd``."""
    with use_backend(backend):
        y = kernels.linear_forward(x, w, b, parse_roles(roles), parse_arith(fwd), _seed(seed), scales)
    return y.contiguous()


@linear.register_fake
def _(x, w, b, roles, fwd, bwd, seed, scales=None, history=None, backend="auto"):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.custom_op("mpc::linear_backward", mutates_args=())
def linear_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, has_bias: bool, roles: str, fwd: str,
                    bwd: str, seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with use_backend(backend):
        gx, gw, gb = kernels.linear_backward(grad, x, w, has_bias, parse_roles(roles), parse_arith(fwd),
                                             parse_arith(bwd), _seed(seed), scales)
    return _dense(gx, gw, gb, w)


def _dense(gx, gw, gb, w) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous gradients (the layout the fake implementations promise); no bias: empty."""
    return gx.contiguous(), gw.contiguous(), gb.contiguous() if gb is not None else w.new_empty(0)


@linear_backward.register_fake
def _(grad, x, w, has_bias, roles, fwd, bwd, seed, scales=None, backend="auto"):
    return x.new_empty(x.shape), w.new_empty(w.shape), w.new_empty(w.shape[0] if has_bias else 0)


def _linear_setup(ctx, inputs, output):
    x, w, b, ctx.roles, ctx.fwd, ctx.bwd, seed, scales, history, ctx.backend = inputs
    ctx.has_bias = b is not None
    _history_setup(ctx, scales, history)
    ctx.save_for_backward(x, w, seed)


def _linear_grad(ctx, grad):
    x, w, seed = ctx.saved_tensors
    gx, gw, gb = torch.ops.mpc.linear_backward(grad, x, w, ctx.has_bias, ctx.roles, ctx.fwd, ctx.bwd, seed,
                                               _backward_scales(ctx, grad), ctx.backend)
    return (gx, gw, gb if ctx.has_bias else None) + (None,) * 7


linear.register_autograd(_linear_grad, setup_context=_linear_setup)


def _count_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((), dtype=torch.int64)


@torch.library.custom_op("mpc::linear_recompute", mutates_args=())
def linear_recompute(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], roles: str, fwd: str, bwd: str,
                     high: str, phi: str, seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                     history: Optional[torch.Tensor] = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``linear`` with the components whose kappa estimate exceeds ``high``'s tau recomputed in its
    arithmetic; and the number of components left in ``fwd``."""
    with use_backend(backend):
        y, low = kernels.linear_recompute(x, w, b, parse_roles(roles), parse_arith(fwd), parse_recompute(high), phi,
                                          _seed(seed), scales)
    return y.contiguous(), low


@linear_recompute.register_fake
def _(x, w, b, roles, fwd, bwd, high, phi, seed, scales=None, history=None, backend="auto"):
    return x.new_empty(*x.shape[:-1], w.shape[0]), _count_like(x)


def _linear_recompute_setup(ctx, inputs, output):
    _linear_setup(ctx, inputs[:6] + inputs[8:], output)


def _linear_recompute_grad(ctx, grad, _):
    return _linear_grad(ctx, grad)[:3] + (None,) * 9


linear_recompute.register_autograd(_linear_recompute_grad, setup_context=_linear_recompute_setup)


# -- matmul ---------------------------------------------------------------------------------------
@torch.library.custom_op("mpc::matmul", mutates_args=())
def matmul(a: torch.Tensor, b: torch.Tensor, roles: str, fwd: str, bwd: str, seed: Optional[torch.Tensor],
           scales: Optional[torch.Tensor] = None, history: Optional[torch.Tensor] = None,
           backend: str = "auto") -> torch.Tensor:
    """torch.matmul (broadcasting, 1-d operands) with roles input = a, weight = b."""
    with use_backend(backend):
        y = kernels.matmul_forward(a, b, parse_roles(roles), parse_arith(fwd), _seed(seed), scales)
    return y.contiguous()


@matmul.register_fake
def _(a, b, roles, fwd, bwd, seed, scales=None, history=None, backend="auto"):
    return a.new_empty(torch.matmul(a, b).shape)


@torch.library.custom_op("mpc::matmul_backward", mutates_args=())
def matmul_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, roles: str, fwd: str, bwd: str,
                    seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    with use_backend(backend):
        ga, gb = kernels.matmul_backward(grad, a, b, parse_roles(roles), parse_arith(fwd), parse_arith(bwd),
                                         _seed(seed), scales)
    return ga.contiguous(), gb.contiguous()


@matmul_backward.register_fake
def _(grad, a, b, roles, fwd, bwd, seed, scales=None, backend="auto"):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _matmul_setup(ctx, inputs, output):
    a, b, ctx.roles, ctx.fwd, ctx.bwd, seed, scales, history, ctx.backend = inputs
    _history_setup(ctx, scales, history)
    ctx.save_for_backward(a, b, seed)


def _matmul_grad(ctx, grad):
    a, b, seed = ctx.saved_tensors
    ga, gb = torch.ops.mpc.matmul_backward(grad, a, b, ctx.roles, ctx.fwd, ctx.bwd, seed, _backward_scales(ctx, grad),
                                           ctx.backend)
    return (ga, gb) + (None,) * 7


matmul.register_autograd(_matmul_grad, setup_context=_matmul_setup)


@torch.library.custom_op("mpc::matmul_recompute", mutates_args=())
def matmul_recompute(a: torch.Tensor, b: torch.Tensor, roles: str, fwd: str, bwd: str, high: str, phi: str,
                     seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                     history: Optional[torch.Tensor] = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``matmul`` with recomputed components, as ``linear_recompute``."""
    with use_backend(backend):
        y, low = kernels.matmul_recompute(a, b, parse_roles(roles), parse_arith(fwd), parse_recompute(high), phi,
                                          _seed(seed), scales)
    return y.contiguous(), low


@matmul_recompute.register_fake
def _(a, b, roles, fwd, bwd, high, phi, seed, scales=None, history=None, backend="auto"):
    return a.new_empty(torch.matmul(a, b).shape), _count_like(a)


def _matmul_recompute_setup(ctx, inputs, output):
    _matmul_setup(ctx, inputs[:5] + inputs[7:], output)


def _matmul_recompute_grad(ctx, grad, _):
    return _matmul_grad(ctx, grad)[:2] + (None,) * 9


matmul_recompute.register_autograd(_matmul_recompute_grad, setup_context=_matmul_recompute_setup)


# -- conv -----------------------------------------------------------------------------------------
@torch.library.custom_op("mpc::conv", mutates_args=())
def conv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: list[int], padding: list[int],
         dilation: list[int], groups: int, roles: str, fwd: str, bwd: str, seed: Optional[torch.Tensor],
         scales: Optional[torch.Tensor] = None, history: Optional[torch.Tensor] = None,
         backend: str = "auto") -> torch.Tensor:
    """conv1d/2d/3d (by w's rank) with per-role formats and the forward arithmetic ``fwd``."""
    with use_backend(backend):
        y = kernels.conv_forward(x, w, b, stride, padding, dilation, groups, parse_roles(roles), parse_arith(fwd),
                                 _seed(seed), scales)
    return y.contiguous()


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@conv.register_fake
def _(x, w, b, stride, padding, dilation, groups, roles, fwd, bwd, seed, scales=None, history=None, backend="auto"):
    return x.new_empty(_CONV[w.dim() - 2](x, w, b, stride, padding, dilation, groups).shape)


@torch.library.custom_op("mpc::conv_backward", mutates_args=())
def conv_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, has_bias: bool, stride: list[int],
                  padding: list[int], dilation: list[int], groups: int, roles: str, fwd: str, bwd: str,
                  seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with use_backend(backend):
        gx, gw, gb = kernels.conv_backward(grad, x, w, has_bias, stride, padding, dilation, groups,
                                           parse_roles(roles), parse_arith(fwd), parse_arith(bwd), _seed(seed), scales)
    return _dense(gx, gw, gb, w)


@conv_backward.register_fake
def _(grad, x, w, has_bias, stride, padding, dilation, groups, roles, fwd, bwd, seed, scales=None, backend="auto"):
    return x.new_empty(x.shape), w.new_empty(w.shape), w.new_empty(w.shape[0] if has_bias else 0)


def _conv_setup(ctx, inputs, output):
    (x, w, b, ctx.stride, ctx.padding, ctx.dilation, ctx.groups, ctx.roles, ctx.fwd, ctx.bwd, seed, scales, history,
     ctx.backend) = inputs
    ctx.has_bias = b is not None
    _history_setup(ctx, scales, history)
    ctx.save_for_backward(x, w, seed)


def _conv_grad(ctx, grad):
    x, w, seed = ctx.saved_tensors
    gx, gw, gb = torch.ops.mpc.conv_backward(grad, x, w, ctx.has_bias, ctx.stride, ctx.padding, ctx.dilation,
                                             ctx.groups, ctx.roles, ctx.fwd, ctx.bwd, seed, _backward_scales(ctx, grad),
                                             ctx.backend)
    return (gx, gw, gb if ctx.has_bias else None) + (None,) * 11


conv.register_autograd(_conv_grad, setup_context=_conv_setup)


@torch.library.custom_op("mpc::conv_recompute", mutates_args=())
def conv_recompute(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: list[int],
                   padding: list[int], dilation: list[int], groups: int, roles: str, fwd: str, bwd: str, high: str,
                   phi: str, seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                   history: Optional[torch.Tensor] = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``conv`` with recomputed components, as ``linear_recompute``."""
    with use_backend(backend):
        y, low = kernels.conv_recompute(x, w, b, stride, padding, dilation, groups, parse_roles(roles),
                                        parse_arith(fwd), parse_recompute(high), phi, _seed(seed), scales)
    return y.contiguous(), low


@conv_recompute.register_fake
def _(x, w, b, stride, padding, dilation, groups, roles, fwd, bwd, high, phi, seed, scales=None, history=None,
      backend="auto"):
    return x.new_empty(_CONV[w.dim() - 2](x, w, b, stride, padding, dilation, groups).shape), _count_like(x)


def _conv_recompute_setup(ctx, inputs, output):
    _conv_setup(ctx, inputs[:10] + inputs[12:], output)


def _conv_recompute_grad(ctx, grad, _):
    return _conv_grad(ctx, grad)[:3] + (None,) * 13


conv_recompute.register_autograd(_conv_recompute_grad, setup_context=_conv_recompute_setup)


# -- sum / mean -------------------------------------------------------------------------------------
@torch.library.custom_op("mpc::sum", mutates_args=())
def reduce_sum(x: torch.Tensor, dim: list[int], keepdim: bool, spec: str, seed: Optional[torch.Tensor],
               backend: str = "auto") -> torch.Tensor:
    """x summed over ``dim`` (all if empty) with the accumulator of ``spec``."""
    with use_backend(backend):
        return kernels.reduce_sum(x, dim, keepdim, parse_arith(spec), _seed(seed)).contiguous()


@torch.library.custom_op("mpc::mean", mutates_args=())
def reduce_mean(x: torch.Tensor, dim: list[int], keepdim: bool, spec: str, seed: Optional[torch.Tensor],
                backend: str = "auto") -> torch.Tensor:
    """The sum, then one rounding of sum / count to the accumulator format."""
    with use_backend(backend):
        return kernels.reduce_mean(x, dim, keepdim, parse_arith(spec), _seed(seed)).contiguous()


@reduce_sum.register_fake
def _(x, dim, keepdim, spec, seed, backend="auto"):
    return x.new_empty(x.sum(dim=dim or None, keepdim=keepdim).shape)


@reduce_mean.register_fake
def _(x, dim, keepdim, spec, seed, backend="auto"):
    return x.new_empty(x.sum(dim=dim or None, keepdim=keepdim).shape)


def _reduce_setup(ctx, inputs, output):
    x, ctx.dim, ctx.keepdim = inputs[0], inputs[1], inputs[2]
    ctx.shape = x.shape
    ctx.count = x.numel() // max(output.numel(), 1) if x.numel() else 0


def _sum_grad(ctx, grad):
    if not ctx.keepdim:
        for d in sorted(d % len(ctx.shape) for d in (ctx.dim or range(len(ctx.shape)))):
            grad = grad.unsqueeze(d)
    return grad.expand(ctx.shape), None, None, None, None, None


def _mean_grad(ctx, grad):
    return (_sum_grad(ctx, grad)[0] / ctx.count,) + (None,) * 5


reduce_sum.register_autograd(_sum_grad, setup_context=_reduce_setup)
reduce_mean.register_autograd(_mean_grad, setup_context=_reduce_setup)
