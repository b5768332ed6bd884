"""condition: per-op condition number estimates on calibration data.

Reads: ``meta["mpc"]["gemm"]`` and ``["facts"]`` (classify). Writes ``meta["mpc"]["kappa"]``
= {"median", "p99", "max"} over the output elements of every batch, and sets the facts'
``kappa`` (what ``kappa_above`` / ``kappa_below`` select on) to the p99.

- dot products (GEMM-like ops but attention and sdpa): kappa_v = (|W||x| + |b|) / |Wx + b| per output
  element;
- activations: kappa_phi = |v phi'(v)| / |phi(v)| per element (0 where both are 0, as for a
  ReLU's negative side, whose output does not move).

Both formulas are ``ops.kappa``'s, which a GEMM with ``recompute`` also applies per component.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.nn.functional as F

from ..ops.kappa import activation_kappa, magnitudes
from .classify import ATTENTION_KINDS, einsum_operands
from .observe import observe

__all__ = ["estimate_condition"]


def _gemm_kappa(gm, node, kind: str, args, kwargs, out) -> torch.Tensor | None:
    if kind in ATTENTION_KINDS:
        return None  # GEMMs and a softmax: no one dot product to take kappa of
    if kind == "einsum":
        equation, a, b = einsum_operands(args)
        return torch.einsum(equation, a.abs(), b.abs()) / out.abs()
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        w, b, x = module.weight, module.bias, args[0]
        conv_args, conv = (), {k: getattr(module, k) for k in ("stride", "padding", "dilation", "groups") if kind != "linear"}
        if kind != "linear" and module.padding_mode != "zeros":  # |pad(x)| = pad(|x|) for every mode
            x, conv["padding"] = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), 0
    else:  # F.conv2d(x, w, b, stride, ...): the settings may be positional
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        conv_args, conv = args[3:], {k: v for k, v in kwargs.items() if k in ("stride", "padding", "dilation", "groups")}
    return magnitudes(kind, x, w, b, *conv_args, **conv) / out.abs()


def _activation_kappa(gm, node, args, kwargs, out) -> torch.Tensor | None:
    v = args[0]
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.shape != out.shape:
        return None  # not elementwise (softmax over a dim is, but its phi' is a Jacobian)
    fn = gm.get_submodule(node.target) if node.op == "call_module" else (
        (lambda t: getattr(t, node.target)(*args[1:], **kwargs)) if node.op == "call_method"
        else (lambda t: node.target(t, *args[1:], **kwargs)))
    return activation_kappa(fn, v)


def estimate_condition(gm: torch.fx.GraphModule, batches: Iterable[tuple]) -> None:
    """Estimate and record condition numbers of GEMM-like ops and activations.

    Args:
        gm: the classified traced model.
        batches: calibration inputs, each a tuple of forward's positional arguments.
    """
    values: dict[torch.fx.Node, list[torch.Tensor]] = {}

    def collect(node, args, kwargs, out):
        meta = node.meta.get("mpc", {})
        facts = meta.get("facts")
        if "gemm" in meta:
            kappa = _gemm_kappa(gm, node, meta["gemm"], args, kwargs, out)
        elif facts is not None and facts.group == "activation":
            kappa = _activation_kappa(gm, node, args, kwargs, out)
        else:
            return
        if kappa is not None:
            values.setdefault(node, []).append(kappa.flatten().double())

    observe(gm, batches, collect)
    for node, parts in values.items():
        k = torch.cat(parts)
        k = k[~k.isnan()]
        if k.numel() == 0:
            continue
        k = k.sort().values  # nearest-rank quantiles: infinities (zero outputs) sort last
        rank = lambda q: k[min(k.numel() - 1, int(q * (k.numel() - 1) + 0.5))].item()
        summary = {"median": rank(0.5), "p99": rank(0.99), "max": k[-1].item()}
        meta = node.meta["mpc"]
        meta["kappa"] = summary
        meta["facts"] = dataclasses.replace(meta["facts"], kappa=summary["p99"])
