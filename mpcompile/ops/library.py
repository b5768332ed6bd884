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

Each op's signature is declared once, by its Python function (``mpc_op``): autograd formulas
read their inputs by argument name (``inputs_of``) and return one gradient per argument
(``gradients``), so no formula counts positions. Ops of other files (``addmm``,
``conv_transpose``) are built with the same helpers.
"""
from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..backends import use_backend
from . import bodies
from .roles import delayed_scale, quantize_role, record_amax
from .spec import ROLES, parse_arith, parse_quant, parse_recompute, parse_roles

__all__ = ["mpc_op", "inputs_of", "gradients", "seed_value", "grad_seed", "save_gemm", "backward_scales", "dense",
           "count_like", "delayed_scales", "quant", "linear", "matmul", "conv", "linear_recompute", "matmul_recompute",
           "conv_recompute", "reduce_sum", "reduce_mean"]


# -- declaring ops ----------------------------------------------------------------------------------
_ARGUMENTS: dict[object, tuple[str, ...]] = {}  # op -> its argument names, in schema order


def mpc_op(name: str, *, mutates_args: tuple[str, ...] = ()) -> Callable:
    """``torch.library.custom_op("mpc::<name>")`` of the decorated function, whose argument names
    (the op's schema) are kept for ``inputs_of`` and ``gradients``."""
    def define(fn: Callable):
        op = torch.library.custom_op(f"mpc::{name}", mutates_args=mutates_args)(fn)
        _ARGUMENTS[op] = tuple(inspect.signature(fn).parameters)
        return op
    return define


def inputs_of(op, inputs: tuple) -> SimpleNamespace:
    """The ``inputs`` a setup_context of ``op`` receives, by the op's argument names."""
    names = _ARGUMENTS[op]
    if len(inputs) != len(names):
        raise TypeError(f"mpc op {names}: got {len(inputs)} inputs")
    return SimpleNamespace(**dict(zip(names, inputs)))


def gradients(op, **grads) -> tuple:
    """One gradient per argument of ``op``, in order: those named, None for the others."""
    names = _ARGUMENTS[op]
    unknown = set(grads) - set(names)
    if unknown:
        raise TypeError(f"gradients of {', '.join(sorted(unknown))}: not arguments of the op ({', '.join(names)})")
    return tuple(grads.get(name) for name in names)


def seed_value(seed: Optional[torch.Tensor]) -> int | None:
    """An op's seed tensor as the int the bodies take (None: no stochastic rounding)."""
    return None if seed is None else int(seed)


def grad_seed(seed: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The seed of a gradient's own random bits, derived from the op's seed."""
    return None if seed is None else seed ^ 0x2545F491  # another word: the gradient's own bits


_GRAD_OUTPUT = ROLES.index("grad_output")


def save_gemm(ctx, args: SimpleNamespace, *tensors: str) -> None:
    """What the backward of a GEMM-like op reads from its inputs ``args`` (``inputs_of``): roles,
    fwd, bwd, backend, scales and history on ctx, and the tensors named and the seed saved
    (``ctx.saved_tensors`` is them in that order, the seed last)."""
    ctx.roles, ctx.fwd, ctx.bwd, ctx.backend = args.roles, args.fwd, args.bwd, args.backend
    ctx.scales, ctx.history = args.scales, args.history
    ctx.save_for_backward(*(getattr(args, t) for t in tensors), args.seed)


def backward_scales(ctx, grad: torch.Tensor) -> Optional[torch.Tensor]:
    """The forward's scales, plus grad_output's from the history when it is tensor_delayed."""
    spec = parse_roles(ctx.roles).get("grad_output")
    if ctx.history is None or spec is None or spec.scaling != "tensor_delayed":
        return ctx.scales
    scales = grad.new_ones(len(ROLES), dtype=torch.float64) if ctx.scales is None else ctx.scales.clone()
    scales[_GRAD_OUTPUT] = delayed_scale(spec, ctx.history[_GRAD_OUTPUT], grad)
    record_amax(ctx.history[_GRAD_OUTPUT], grad)
    return scales


def dense(gx, gw, gb, w) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous gradients (the layout the fake implementations promise); no bias: empty."""
    return gx.contiguous(), gw.contiguous(), gb.contiguous() if gb is not None else w.new_empty(0)


def count_like(x: torch.Tensor) -> torch.Tensor:
    """An empty int64 0-d tensor on x's device: the fake of a count of components."""
    return x.new_empty((), dtype=torch.int64)


# -- delayed scales -------------------------------------------------------------------------------
@mpc_op("delayed_scales", mutates_args=("history",))
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
@mpc_op("quant")
def quant(x: torch.Tensor, fmt: str, grad_fmt: str, axis: int, seed: Optional[torch.Tensor],
          backend: str = "auto") -> torch.Tensor:
    """x rounded to ``fmt`` (a QuantSpec string; "" = unchanged); the gradient to ``grad_fmt``."""
    with use_backend(backend):
        y = quantize_role(x, parse_quant(fmt) if fmt else None, axis=axis, seed=seed_value(seed))
    return y.clone(memory_format=torch.contiguous_format)  # never an alias of x


@quant.register_fake
def _(x, fmt, grad_fmt, axis, seed, backend="auto"):
    return x.new_empty(x.shape)


def _quant_setup(ctx, inputs, output):
    args = inputs_of(quant, inputs)
    ctx.grad_fmt, ctx.axis, ctx.seed, ctx.backend = args.grad_fmt, args.axis, args.seed, args.backend


def _quant_backward(ctx, grad):
    gx = torch.ops.mpc.quant(grad, ctx.grad_fmt, "", ctx.axis, grad_seed(ctx.seed), ctx.backend)
    return gradients(quant, x=gx)


quant.register_autograd(_quant_backward, setup_context=_quant_setup)


# -- linear ---------------------------------------------------------------------------------------
@mpc_op("linear")
def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], roles: str, fwd: str, bwd: str,
           seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
           history: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """y = x W^T + b with per-role formats and the forward arithmetic ``fwd``."""
    with use_backend(backend):
        y = bodies.linear_forward(x, w, b, parse_roles(roles), parse_arith(fwd), seed_value(seed), scales)
    return y.contiguous()


@linear.register_fake
def _(x, w, b, roles, fwd, bwd, seed, scales=None, history=None, backend="auto"):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@mpc_op("linear_backward")
def linear_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, has_bias: bool, roles: str, fwd: str,
                    bwd: str, seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with use_backend(backend):
        gx, gw, gb = bodies.linear_backward(grad, x, w, has_bias, parse_roles(roles), parse_arith(fwd),
                                            parse_arith(bwd), seed_value(seed), scales)
    return dense(gx, gw, gb, w)


@linear_backward.register_fake
def _(grad, x, w, has_bias, roles, fwd, bwd, seed, scales=None, backend="auto"):
    return x.new_empty(x.shape), w.new_empty(w.shape), w.new_empty(w.shape[0] if has_bias else 0)


def _save_linear(ctx, args: SimpleNamespace) -> None:
    save_gemm(ctx, args, "x", "w")
    ctx.has_bias = args.b is not None


def _linear_grads(ctx, grad) -> dict:
    """{x, w, b: gradient} of a linear op."""
    x, w, seed = ctx.saved_tensors
    gx, gw, gb = torch.ops.mpc.linear_backward(grad, x, w, ctx.has_bias, ctx.roles, ctx.fwd, ctx.bwd, seed,
                                               backward_scales(ctx, grad), ctx.backend)
    return {"x": gx, "w": gw, "b": gb if ctx.has_bias else None}


linear.register_autograd(lambda ctx, grad: gradients(linear, **_linear_grads(ctx, grad)),
                         setup_context=lambda ctx, inputs, output: _save_linear(ctx, inputs_of(linear, inputs)))


@mpc_op("linear_recompute")
def linear_recompute(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], roles: str, fwd: str, bwd: str,
                     high: str, phi: str, seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                     history: Optional[torch.Tensor] = None,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``linear`` with the components whose kappa estimate exceeds ``high``'s tau recomputed in its
    arithmetic; and the number of components left in ``fwd``."""
    with use_backend(backend):
        y, low = bodies.linear_recompute(x, w, b, parse_roles(roles), parse_arith(fwd), parse_recompute(high), phi,
                                         seed_value(seed), scales)
    return y.contiguous(), low


@linear_recompute.register_fake
def _(x, w, b, roles, fwd, bwd, high, phi, seed, scales=None, history=None, backend="auto"):
    return x.new_empty(*x.shape[:-1], w.shape[0]), count_like(x)


linear_recompute.register_autograd(
    lambda ctx, grad, _: gradients(linear_recompute, **_linear_grads(ctx, grad)),
    setup_context=lambda ctx, inputs, output: _save_linear(ctx, inputs_of(linear_recompute, inputs)))


# -- matmul ---------------------------------------------------------------------------------------
@mpc_op("matmul")
def matmul(a: torch.Tensor, b: torch.Tensor, roles: str, fwd: str, bwd: str, seed: Optional[torch.Tensor],
           scales: Optional[torch.Tensor] = None, history: Optional[torch.Tensor] = None,
           backend: str = "auto") -> torch.Tensor:
    """torch.matmul (broadcasting, 1-d operands) with roles input = a, weight = b."""
    with use_backend(backend):
        y = bodies.matmul_forward(a, b, parse_roles(roles), parse_arith(fwd), seed_value(seed), scales)
    return y.contiguous()


@matmul.register_fake
def _(a, b, roles, fwd, bwd, seed, scales=None, history=None, backend="auto"):
    return a.new_empty(torch.matmul(a, b).shape)


@mpc_op("matmul_backward")
def matmul_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, roles: str, fwd: str, bwd: str,
                    seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    with use_backend(backend):
        ga, gb = bodies.matmul_backward(grad, a, b, parse_roles(roles), parse_arith(fwd), parse_arith(bwd),
                                        seed_value(seed), scales)
    return ga.contiguous(), gb.contiguous()


@matmul_backward.register_fake
def _(grad, a, b, roles, fwd, bwd, seed, scales=None, backend="auto"):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _matmul_grads(ctx, grad) -> dict:
    """{a, b: gradient} of a matmul op."""
    a, b, seed = ctx.saved_tensors
    ga, gb = torch.ops.mpc.matmul_backward(grad, a, b, ctx.roles, ctx.fwd, ctx.bwd, seed, backward_scales(ctx, grad),
                                           ctx.backend)
    return {"a": ga, "b": gb}


matmul.register_autograd(lambda ctx, grad: gradients(matmul, **_matmul_grads(ctx, grad)),
                         setup_context=lambda ctx, inputs, output: save_gemm(ctx, inputs_of(matmul, inputs), "a", "b"))


@mpc_op("matmul_recompute")
def matmul_recompute(a: torch.Tensor, b: torch.Tensor, roles: str, fwd: str, bwd: str, high: str, phi: str,
                     seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                     history: Optional[torch.Tensor] = None,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``matmul`` with recomputed components, as ``linear_recompute``."""
    with use_backend(backend):
        y, low = bodies.matmul_recompute(a, b, parse_roles(roles), parse_arith(fwd), parse_recompute(high), phi,
                                         seed_value(seed), scales)
    return y.contiguous(), low


@matmul_recompute.register_fake
def _(a, b, roles, fwd, bwd, high, phi, seed, scales=None, history=None, backend="auto"):
    return a.new_empty(torch.matmul(a, b).shape), count_like(a)


matmul_recompute.register_autograd(
    lambda ctx, grad, _: gradients(matmul_recompute, **_matmul_grads(ctx, grad)),
    setup_context=lambda ctx, inputs, output: save_gemm(ctx, inputs_of(matmul_recompute, inputs), "a", "b"))


# -- conv -----------------------------------------------------------------------------------------
@mpc_op("conv")
def conv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: list[int], padding: list[int],
         dilation: list[int], groups: int, roles: str, fwd: str, bwd: str, seed: Optional[torch.Tensor],
         scales: Optional[torch.Tensor] = None, history: Optional[torch.Tensor] = None,
         backend: str = "auto") -> torch.Tensor:
    """conv1d/2d/3d (by w's rank) with per-role formats and the forward arithmetic ``fwd``."""
    with use_backend(backend):
        y = bodies.conv_forward(x, w, b, stride, padding, dilation, groups, parse_roles(roles), parse_arith(fwd),
                                seed_value(seed), scales)
    return y.contiguous()


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@conv.register_fake
def _(x, w, b, stride, padding, dilation, groups, roles, fwd, bwd, seed, scales=None, history=None, backend="auto"):
    return x.new_empty(_CONV[w.dim() - 2](x, w, b, stride, padding, dilation, groups).shape)


@mpc_op("conv_backward")
def conv_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, has_bias: bool, stride: list[int],
                  padding: list[int], dilation: list[int], groups: int, roles: str, fwd: str, bwd: str,
                  seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with use_backend(backend):
        gx, gw, gb = bodies.conv_backward(grad, x, w, has_bias, stride, padding, dilation, groups,
                                          parse_roles(roles), parse_arith(fwd), parse_arith(bwd), seed_value(seed),
                                          scales)
    return dense(gx, gw, gb, w)


@conv_backward.register_fake
def _(grad, x, w, has_bias, stride, padding, dilation, groups, roles, fwd, bwd, seed, scales=None, backend="auto"):
    return x.new_empty(x.shape), w.new_empty(w.shape), w.new_empty(w.shape[0] if has_bias else 0)


def _save_conv(ctx, args: SimpleNamespace) -> None:
    save_gemm(ctx, args, "x", "w")
    ctx.has_bias = args.b is not None
    ctx.conv = (args.stride, args.padding, args.dilation, args.groups)


def _conv_grads(ctx, grad) -> dict:
    """{x, w, b: gradient} of a conv op."""
    x, w, seed = ctx.saved_tensors
    gx, gw, gb = torch.ops.mpc.conv_backward(grad, x, w, ctx.has_bias, *ctx.conv, ctx.roles, ctx.fwd, ctx.bwd, seed,
                                             backward_scales(ctx, grad), ctx.backend)
    return {"x": gx, "w": gw, "b": gb if ctx.has_bias else None}


conv.register_autograd(lambda ctx, grad: gradients(conv, **_conv_grads(ctx, grad)),
                       setup_context=lambda ctx, inputs, output: _save_conv(ctx, inputs_of(conv, inputs)))


@mpc_op("conv_recompute")
def conv_recompute(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: list[int],
                   padding: list[int], dilation: list[int], groups: int, roles: str, fwd: str, bwd: str, high: str,
                   phi: str, seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                   history: Optional[torch.Tensor] = None,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``conv`` with recomputed components, as ``linear_recompute``."""
    with use_backend(backend):
        y, low = bodies.conv_recompute(x, w, b, stride, padding, dilation, groups, parse_roles(roles),
                                       parse_arith(fwd), parse_recompute(high), phi, seed_value(seed), scales)
    return y.contiguous(), low


@conv_recompute.register_fake
def _(x, w, b, stride, padding, dilation, groups, roles, fwd, bwd, high, phi, seed, scales=None, history=None,
      backend="auto"):
    return x.new_empty(_CONV[w.dim() - 2](x, w, b, stride, padding, dilation, groups).shape), count_like(x)


conv_recompute.register_autograd(
    lambda ctx, grad, _: gradients(conv_recompute, **_conv_grads(ctx, grad)),
    setup_context=lambda ctx, inputs, output: _save_conv(ctx, inputs_of(conv_recompute, inputs)))


# -- sum / mean -------------------------------------------------------------------------------------
@mpc_op("sum")
def reduce_sum(x: torch.Tensor, dim: list[int], keepdim: bool, spec: str, seed: Optional[torch.Tensor],
               backend: str = "auto") -> torch.Tensor:
    """x summed over ``dim`` (all if empty) with the accumulator of ``spec``."""
    with use_backend(backend):
        return bodies.reduce_sum(x, dim, keepdim, parse_arith(spec), seed_value(seed)).contiguous()


@mpc_op("mean")
def reduce_mean(x: torch.Tensor, dim: list[int], keepdim: bool, spec: str, seed: Optional[torch.Tensor],
                backend: str = "auto") -> torch.Tensor:
    """The sum, then one rounding of sum / count to the accumulator format."""
    with use_backend(backend):
        return bodies.reduce_mean(x, dim, keepdim, parse_arith(spec), seed_value(seed)).contiguous()


@reduce_sum.register_fake
def _(x, dim, keepdim, spec, seed, backend="auto"):
    return x.new_empty(x.sum(dim=dim or None, keepdim=keepdim).shape)


@reduce_mean.register_fake
def _(x, dim, keepdim, spec, seed, backend="auto"):
    return x.new_empty(x.sum(dim=dim or None, keepdim=keepdim).shape)


def _reduce_setup(op, ctx, inputs, output):
    args = inputs_of(op, inputs)
    ctx.dim, ctx.keepdim, ctx.shape = args.dim, args.keepdim, args.x.shape
    ctx.count = args.x.numel() // max(output.numel(), 1) if args.x.numel() else 0


def _expanded(ctx, grad):
    """grad of the reduced tensor, broadcast back over the reduced dims."""
    if not ctx.keepdim:
        for d in sorted(d % len(ctx.shape) for d in (ctx.dim or range(len(ctx.shape)))):
            grad = grad.unsqueeze(d)
    return grad.expand(ctx.shape)


reduce_sum.register_autograd(lambda ctx, grad: gradients(reduce_sum, x=_expanded(ctx, grad)),
                             setup_context=lambda ctx, inputs, output: _reduce_setup(reduce_sum, ctx, inputs, output))
reduce_mean.register_autograd(lambda ctx, grad: gradients(reduce_mean, x=_expanded(ctx, grad) / ctx.count),
                              setup_context=lambda ctx, inputs, output: _reduce_setup(reduce_mean, ctx, inputs,
                                                                                      output))
