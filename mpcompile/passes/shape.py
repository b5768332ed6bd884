"""shape: output shape and dtype of every node, from example inputs (torch.fx's ShapeProp).

Reads: nothing. Writes: ``meta["mpc"]["shape"]`` (tuple) and ``["dtype"]`` for tensor outputs.
"""
from __future__ import annotations

import torch
from torch.fx.passes.shape_prop import ShapeProp

from .observe import evaluating

__all__ = ["propagate_shapes"]


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: tuple) -> None:
    """Run ``gm`` once on ``example_inputs`` and record output shapes. It runs in eval mode
    without gradients, so batch norms neither update their statistics nor need a batch > 1.

    Args:
        gm: the traced model.
        example_inputs: positional inputs of its forward.
    """
    with evaluating(gm):
        ShapeProp(gm).propagate(*example_inputs)
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (tuple, list)) and meta and not hasattr(meta, "shape"):  # attention: (output, weights)
            meta = meta[0]
        if meta is not None and hasattr(meta, "shape"):
            node.meta.setdefault("mpc", {}).update(shape=tuple(meta.shape), dtype=meta.dtype)
