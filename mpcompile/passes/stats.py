"""stats: what the assigned formats do to calibration data.

Reads: ``MpcMeta.assignment`` (assign), ``kind`` and ``roles`` (classify) on the traced graph,
and the lowered graph (whose nodes' ``MpcMeta.source`` names the traced node they stand for).
Writes on each quantized traced node ``MpcMeta.stats``: per role with a format and no scaling,
the fractions of values that overflow (above max), flush to zero (below half the smallest
subnormal) and land subnormal; and ``MpcMeta.sqnr_db``, the signal-to-quantization-noise ratio
of the node's output in the lowered model against the fp32 model (errors of earlier layers
included), over all batches: -inf where an output overflowed to inf or NaN.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch

from ..ops.registry import Call, kind_named, role_values
from .meta import RoleStats, mpc_meta
from .observe import observe

__all__ = ["collect_stats"]


def _role_values(gm, node, role: str, args, kwargs, out) -> list[torch.Tensor]:
    """The float tensors that role ``role`` of ``node`` rounds, as lowering applies it."""
    meta = mpc_meta(node)
    kind = kind_named(meta.kind)
    if role not in meta.roles:
        values = []
    elif role == "output":
        values = [out]
    elif role == "input" and not (kind is not None and kind.is_gemm):  # every input of the op but parameters
        values = [v for n, v in _inputs((node.args, node.kwargs), (args, kwargs)) if n.op != "get_attr"]
    elif role in ("input", "weight", "bias"):
        values = role_values(kind, Call(gm, node, args, kwargs), role)
    else:
        values = []
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]


def _inputs(template, values) -> Iterator[tuple[torch.fx.Node, object]]:
    """(input node, its value) pairs of a node's arguments (``template``) and their values."""
    if isinstance(template, torch.fx.Node):
        yield template, values
    elif isinstance(template, (list, tuple)):
        for t, v in zip(template, values):
            yield from _inputs(t, v)
    elif isinstance(template, dict):
        for key, t in template.items():
            yield from _inputs(t, values[key])


def collect_stats(traced: torch.fx.GraphModule, lowered: torch.fx.GraphModule, batches: Iterable[tuple]) -> None:
    """Record format statistics and SQNR of every quantized node (see the module docstring)."""
    batches = list(batches)
    counts: dict[str, dict[str, list[int]]] = {}
    reference: dict[str, list[torch.Tensor]] = {}

    def fp32(node, args, kwargs, out):
        out = out[0] if isinstance(out, tuple) else out  # attention: (output, weights)
        meta = mpc_meta(node)
        assignment = None if meta is None else meta.assignment
        if assignment is None or not assignment.quantizes or not isinstance(out, torch.Tensor):
            return
        reference.setdefault(node.name, []).append(out.double())
        for role, setting in assignment.roles:
            q = setting.quant
            if q is None or q.scaling != "none" or not hasattr(q.fmt, "min_subnormal"):
                continue
            for values in _role_values(traced, node, role, args, kwargs, out):
                a = values.detach().abs()
                tally = counts.setdefault(node.name, {}).setdefault(role, [0, 0, 0, 0])
                tally[0] += int((a > q.fmt.max).sum())
                tally[1] += int(((a > 0) & (a < q.fmt.min_subnormal / 2)).sum())
                tally[2] += int(((a >= q.fmt.min_subnormal / 2) & (a < q.fmt.min_normal)).sum())
                tally[3] += a.numel()

    observe(traced, batches, fp32)
    noise: dict[str, list[float]] = {}

    def low(node, args, kwargs, out):
        out = out[0] if isinstance(out, tuple) else out
        name = getattr(mpc_meta(node), "source", None)
        if name in reference and isinstance(out, torch.Tensor):
            ref = reference[name][len(noise.setdefault(name, [])) // 2]
            noise[name] += [float(ref.square().sum()), float((ref - out.double()).square().sum())]

    observe(lowered, batches, low)
    for node in traced.graph.nodes:
        if node.name not in reference:
            continue
        signal, err = sum(noise.get(node.name, [])[0::2]), sum(noise.get(node.name, [])[1::2])
        meta = mpc_meta(node)
        meta.stats = {role: RoleStats(overflow=t[0] / t[3], flush_to_zero=t[1] / t[3], subnormal=t[2] / t[3])
                      for role, t in counts.get(node.name, {}).items() if t[3]}
        meta.sqnr_db = _sqnr_db(signal, err)


def _sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): inf without noise; -inf without signal, or where the noise is
    unbounded (an output that overflowed to inf or became NaN)."""
    if noise == 0:
        return math.inf
    ratio = signal / noise if math.isfinite(noise) else 0.0
    return 10 * math.log10(ratio) if ratio > 0 else -math.inf  # NaN (a NaN reference) is not > 0
