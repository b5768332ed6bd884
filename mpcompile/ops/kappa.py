"""Condition numbers per output component: of a GEMM's dot products, of the elementwise
activation that consumes them, and of the two composed.

For v = w . x + b and an activation phi (El Arar, Filip, Mary and Riccietti 2025):

- kappa_v = (|w| . |x| + |b|) / |v|, the dot product's;
- kappa_phi = |v phi'(v)| / |phi(v)|, the activation's;
- kappa_v * kappa_phi = |phi'(v)| (|w| . |x| + |b|) / |phi(v)|, which bounds the relative error
  of phi(v) per unit of relative error in the summands. ``component_kappa`` forms this product
  in one quotient, so that v = 0 gives 0 or inf rather than inf * 0.

The ``condition`` pass summarises these on calibration data; a GEMM with ``recompute`` selects
on ``component_kappa`` per output component. Activations are named by the strings of
``ACTIVATIONS``, with one numeric argument where they take one: ``leaky_relu(0.01)``, ``elu(1.0)``;
their slopes are torch's own derivative kernels (``aten.*_backward``, called directly), so
they run inside custom ops and compiled graphs, where autograd and ``torch.func`` do not.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .spec import SpecError

__all__ = ["ACTIVATIONS", "Activation", "magnitudes", "activation", "value_and_slope", "activation_kappa",
           "component_kappa"]

_aten = torch.ops.aten


@dataclass(frozen=True)
class Activation:
    """An elementwise phi with its slope: ``slope(v, phi(v), a)`` is phi'(v), ``a`` its argument."""

    fn: Callable[..., torch.Tensor]
    slope: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    argument: float | None = None  # leaky_relu's negative slope, elu's alpha

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.fn(v) if self.argument is None else self.fn(v, self.argument)


def _ones(v: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(v)


# name -> (phi(v[, argument]), phi'(v) from (v, phi(v), argument), default argument); every one elementwise
ACTIVATIONS: dict[str, tuple[Callable[..., torch.Tensor], Callable, float | None]] = {
    "relu": (F.relu, lambda v, y, a: _aten.threshold_backward(_ones(v), y, 0), None),
    "relu6": (F.relu6, lambda v, y, a: _aten.hardtanh_backward(_ones(v), v, 0.0, 6.0), None),
    "gelu": (F.gelu, lambda v, y, a: _aten.gelu_backward(_ones(v), v), None),
    "gelu_tanh": (functools.partial(F.gelu, approximate="tanh"),
                  lambda v, y, a: _aten.gelu_backward(_ones(v), v, approximate="tanh"), None),
    "silu": (F.silu, lambda v, y, a: _aten.silu_backward(_ones(v), v), None),
    "sigmoid": (torch.sigmoid, lambda v, y, a: _aten.sigmoid_backward(_ones(v), y), None),
    "tanh": (torch.tanh, lambda v, y, a: _aten.tanh_backward(_ones(v), y), None),
    "hardswish": (F.hardswish, lambda v, y, a: _aten.hardswish_backward(_ones(v), v), None),
    "hardsigmoid": (F.hardsigmoid, lambda v, y, a: _aten.hardsigmoid_backward(_ones(v), v), None),
    "leaky_relu": (F.leaky_relu, lambda v, y, a: _aten.leaky_relu_backward(_ones(v), v, a, False), 0.01),
    "elu": (F.elu, lambda v, y, a: _aten.elu_backward(_ones(v), a, 1, 1, False, v), 1.0),
}
_NAME = re.compile(r"^([a-z_0-9]+)(?:\((.+)\))?$")
_GEMMS = {"linear": F.linear, "conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d,
          "matmul": lambda a, b, bias: torch.matmul(a, b)}


def magnitudes(kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *args,
               **kwargs) -> torch.Tensor:
    """|w| . |x| + |b| for every output component of a GEMM: torch's op on absolute values.

    Args:
        kind: ``linear``, ``conv1d``/``conv2d``/``conv3d`` or ``matmul`` (which has no bias).
        x, w, b: the operands as the op takes them (``torch.matmul``: x = a, w = b).
        *args, **kwargs: the convolution's stride, padding, dilation, groups.
    """
    if kind not in _GEMMS:
        raise ValueError(f"magnitudes: kind {kind!r} is not one of {', '.join(_GEMMS)}")
    bias = None if b is None else b.abs()
    return _GEMMS[kind](x.abs(), w.abs(), bias, *args, **kwargs)


@functools.lru_cache(maxsize=256)
def activation(name: str) -> Activation:
    """The elementwise function ``name`` stands for (see ``ACTIVATIONS``), with its slope.

    Args:
        name: ``relu``, ``tanh``, ..., or ``leaky_relu(<negative slope>)`` / ``elu(<alpha>)``.

    Raises:
        SpecError: an unknown name or a bad argument.
    """
    m = _NAME.match(name.strip())
    if m is None or m.group(1) not in ACTIVATIONS:
        raise SpecError(f"activation {name!r} is not one of {', '.join(ACTIVATIONS)} "
                        f"(leaky_relu and elu take their argument in parentheses: leaky_relu(0.01))")
    fn, slope, default = ACTIVATIONS[m.group(1)]
    if m.group(2) is None:
        return Activation(fn, slope, default)
    try:
        value = float(m.group(2))
    except ValueError:
        value = math.nan
    if default is None or not math.isfinite(value):
        takes = [n for n, (_, _, d) in ACTIVATIONS.items() if d is not None]
        raise SpecError(f"activation {name!r}: only {' and '.join(takes)} take an argument, a finite number")
    return Activation(fn, slope, value)


def value_and_slope(fn: "Activation | Callable[[torch.Tensor], torch.Tensor]",
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi(v), phi'(v)) of an elementwise ``fn``, the slope by torch's own derivative formula.

    An ``Activation`` calls its derivative kernel directly; any other callable (a module, a
    function with its arguments bound; it may work in place) goes through ``torch.func.vjp``,
    which also works under ``no_grad`` but not inside a compiled graph.
    """
    if isinstance(fn, Activation):
        y = fn(v)
        return y, fn.slope(v, y, fn.argument)
    y, vjp = torch.func.vjp(lambda t: fn(t.clone()), v.detach())
    (slope,) = vjp(torch.ones_like(y))
    return y, slope


def activation_kappa(fn: "Activation | Callable[[torch.Tensor], torch.Tensor]", v: torch.Tensor) -> torch.Tensor:
    """kappa_phi = |v phi'(v)| / |phi(v)| per element; 0 where the numerator is 0 (a ReLU's
    negative side: the output does not move)."""
    y, slope = value_and_slope(fn, v)
    num = (v * slope).abs()
    return torch.where(num == 0, 0.0, num / y.abs())


def component_kappa(magnitude: torch.Tensor, v: torch.Tensor,
                    phi: "Activation | Callable[[torch.Tensor], torch.Tensor] | None" = None) -> torch.Tensor:
    """kappa_v * kappa_phi per component, in float64: |phi'(v)| (|w| . |x| + |b|) / |phi(v)|.

    0 where the numerator is 0 (the component is exact, or phi is flat there), inf where phi(v)
    is 0 and the numerator is not, and inf where v is not finite (an overflowed sum has no
    estimate and is always recomputed).

    Args:
        magnitude: |w| . |x| + |b| (``magnitudes``).
        v: the computed dot products w . x + b.
        phi: the activation that consumes v (None: the identity, giving kappa_v alone).
    """
    y, slope = (v, torch.ones_like(v)) if phi is None else value_and_slope(phi, v)
    top = magnitude.double() * slope.double().abs()
    kappa = torch.where(top == 0, 0.0, top / y.double().abs())
    return torch.where(v.isfinite(), kappa, math.inf)
