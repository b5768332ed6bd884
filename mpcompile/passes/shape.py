"""shape: output shape and dtype of every node, from example inputs (torch.fx's ShapeProp).

Reads: nothing. Writes: ``MpcMeta.shape`` and ``dtype`` of every node with a tensor output (an
attention module's: its first output's).
"""
from __future__ import annotations

import torch
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import CompileError
from .meta import meta_of
from .observe import evaluating

__all__ = ["propagate_shapes"]


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it runs, so a failure can name it."""

    node: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node):
        self.node = n
        return super().run_node(n)


def _described(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(map(_described, value)) + ")"
    return type(value).__name__


def _where(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    module = next(reversed(stack.values()))[0] if stack else node.target if node.op == "call_module" else ""
    return f"node {node.name} ({node.format_node().split(' = ', 1)[-1][:80]}, module '{module or '<root>'}')"


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: tuple) -> None:
    """Run ``gm`` once on ``example_inputs`` and record output shapes. It runs in eval mode
    without gradients, so batch norms neither update their statistics nor need a batch > 1.

    Args:
        gm: the traced model.
        example_inputs: its placeholders' values.

    Raises:
        CompileError: a node fails on these inputs (a shape or dtype mismatch...); the message
            names the node, its module and the shapes and dtypes it got.
    """
    prop = _ShapeProp(gm)
    with evaluating(gm):
        try:
            prop.propagate(*example_inputs)
        except Exception as err:
            node = prop.node
            if node is None or node.op == "placeholder":
                raise CompileError(f"the example inputs do not fit {type(gm).__name__}'s forward: {err}") from err
            args, kwargs = prop.fetch_args_kwargs_from_env(node)
            got = ", ".join([_described(a) for a in args] + [f"{k}={_described(v)}" for k, v in kwargs.items()])
            text = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise CompileError(f"{_where(node)} fails on the example inputs: {type(err).__name__}: {text}\n"
                               f"  it got: {got}") from err
    for node in gm.graph.nodes:
        tensor = node.meta.get("tensor_meta")
        if isinstance(tensor, (tuple, list)) and tensor and not hasattr(tensor, "shape"):  # attention: (output, weights)
            tensor = tensor[0]
        if tensor is not None and hasattr(tensor, "shape"):
            meta = meta_of(node)
            meta.shape, meta.dtype = tuple(tensor.shape), tensor.dtype
