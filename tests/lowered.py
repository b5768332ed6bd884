"""Shared checks of lowered models: which ``mpcompile.ops`` a compiled graph calls, and a
low-precision forward and backward against the fp32 model."""
from __future__ import annotations

import torch


def ops_called(cm) -> list:
    """The ``mpcompile.ops`` functions the compiled model's graph calls, in order."""
    return [n.target for n in cm.graph_module.graph.nodes
            if n.op == "call_function" and n.target.__module__.startswith("mpcompile.ops")]


def check_low_precision_run(cm, model, inputs: tuple, bound: float = 0.2) -> torch.Tensor:
    """Run ``cm`` forward and backward: finite gradients for every parameter, and an output that
    differs from ``model``'s by a relative error in (0, bound). Returns the output."""
    y = cm(*inputs)
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    want = model(*inputs)
    assert torch.isfinite(y).all() and 0 < float((y - want).norm() / want.norm()) < bound
    return y.detach()
