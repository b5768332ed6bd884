"""condition: per-op condition number estimates on calibration data.

Reads: ``MpcMeta.kind`` and ``group`` (classify). Writes ``MpcMeta.kappa`` (median, p99, max
over the output elements of every batch); policies select on the p99.

- dot products (GEMM-like kinds the registry marks ``bilinear``): kappa_v = (|W||x| + |b|) /
  |Wx + b| per output element, the op itself on absolute values;
- activations: kappa_phi = |v phi'(v)| / |phi(v)| per element (0 where both are 0, as for a
  ReLU's negative side, whose output does not move).

Both formulas are ``ops.kappa``'s, which a GEMM with ``recompute`` also applies per component.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..ops.kappa import activation_kappa
from ..ops.registry import Call, kind_named
from .meta import KappaSummary, mpc_meta
from .observe import observe

__all__ = ["estimate_condition"]

def _absolute(value):
    """A float tensor's absolute value; anything else as it is."""
    return value.abs() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _gemm_kappa(call: Call, out: torch.Tensor) -> torch.Tensor:
    """The call on the absolute values of its operands (a module's parameters too), over |out|."""
    args, kwargs = torch.fx.node.map_aggregate((call.args, call.kwargs), _absolute)
    node = call.node
    if node.op == "call_module":
        params = {name: p.abs() for name, p in call.module.named_parameters(recurse=False)}
        magnitude = torch.func.functional_call(call.module, params, tuple(args), dict(kwargs))
    elif node.op == "call_method":
        magnitude = getattr(args[0], node.target)(*args[1:], **kwargs)
    else:
        magnitude = node.target(*args, **kwargs)
    return magnitude / out.abs()


def _activation_kappa(call: Call, out) -> torch.Tensor | None:
    v, node, rest, kwargs = call.args[0], call.node, call.args[1:], call.kwargs
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.shape != out.shape:
        return None  # not elementwise (softmax over a dim is, but its phi' is a Jacobian)
    fn = call.module if node.op == "call_module" else (
        (lambda t: getattr(t, node.target)(*rest, **kwargs)) if node.op == "call_method"
        else (lambda t: node.target(t, *rest, **kwargs)))
    return activation_kappa(fn, v)


def estimate_condition(gm: torch.fx.GraphModule, batches: Iterable[tuple]) -> None:
    """Estimate and record condition numbers of GEMM-like ops and activations.

    Args:
        gm: the classified traced model.
        batches: calibration inputs, each a tuple of forward's positional arguments.
    """
    values: dict[torch.fx.Node, list[torch.Tensor]] = {}

    def collect(node, args, kwargs, out):
        meta = mpc_meta(node)
        bilinear = meta is not None and meta.kind is not None and kind_named(meta.kind).bilinear
        if not (bilinear or (meta is not None and meta.group == "activation")):
            return
        call = Call(gm, node, args, kwargs)
        kappa = _gemm_kappa(call, out) if bilinear else _activation_kappa(call, out)
        if kappa is not None:
            values.setdefault(node, []).append(kappa.flatten().double())

    observe(gm, batches, collect)
    for node, parts in values.items():
        k = torch.cat(parts)
        k = k[~k.isnan()]
        if k.numel() == 0:
            continue
        # nearest-rank quantiles (infinities, from zero outputs, rank last); kthvalue: no full sort of a large output
        rank = lambda q: k.kthvalue(min(k.numel() - 1, int(q * (k.numel() - 1) + 0.5)) + 1).values.item()
        mpc_meta(node).kappa = KappaSummary(median=rank(0.5), p99=rank(0.99), max=k.max().item())
