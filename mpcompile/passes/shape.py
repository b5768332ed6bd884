"""shape: output shape and dtype of every node, from example inputs (torch.fx's ShapeProp).

Reads: nothing. Writes: ``MpcMeta.shape`` and ``dtype`` of every node with a tensor output (an
attention module's: its first output's).
"""
from __future__ import annotations

import torch
from torch.fx.passes.shape_prop import ShapeProp

from .meta import meta_of
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
        tensor = node.meta.get("tensor_meta")
        if isinstance(tensor, (tuple, list)) and tensor and not hasattr(tensor, "shape"):  # attention: (output, weights)
            tensor = tensor[0]
        if tensor is not None and hasattr(tensor, "shape"):
            meta = meta_of(node)
            meta.shape, meta.dtype = tuple(tensor.shape), tensor.dtype
