"""shape: output shape and dtype of every node, from one run on the example inputs.

Reads: nothing. Writes: ``MpcMeta.shape`` and ``dtype`` of every node with a tensor output (an
attention module's: its first output's), and ``node.meta["type"]`` (the output's type, as
torch.fx's ShapeProp writes it) of every node. An fx Interpreter rather than ShapeProp itself,
which prints a traceback of its own before it re-raises: a failure here is a CompileError that
names the node, its module and what it got.
"""
from __future__ import annotations

import torch

from ..errors import CompileError, first_line
from .classify import op_type, owner
from .meta import meta_of
from .observe import evaluating

__all__ = ["propagate_shapes"]


class _Shapes(torch.fx.Interpreter):
    """Records each node's output type, shape and dtype, and the node it runs (for errors)."""

    node: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node):
        self.node = n
        result = super().run_node(n)
        n.meta["type"] = type(result)
        tensor = result[0] if isinstance(result, (tuple, list)) and result else result  # attention: (output, weights)
        if isinstance(tensor, torch.Tensor):
            meta = meta_of(n)
            meta.shape, meta.dtype = tuple(tensor.shape), tensor.dtype
        return result


def _described(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(map(_described, value)) + ")"
    return type(value).__name__


def _where(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """``node fc (Linear, module 'fc')``: the node, what it calls and the module it belongs to."""
    module = node.target if node.op == "call_module" else (owner(node) or ("",))[0]
    return f"node {node.name} ({op_type(gm, node)}, module '{module or '<root>'}')"


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
    run = _Shapes(gm)
    with evaluating(gm):
        try:
            run.run(*example_inputs)
        except Exception as err:
            node = run.node
            if node is None or node.op == "placeholder":
                raise CompileError(f"the example inputs do not fit {type(gm).__name__}'s forward: {err}") from err
            args, kwargs = run.fetch_args_kwargs_from_env(node)
            got = ", ".join([_described(a) for a in args] + [f"{k}={_described(v)}" for k, v in kwargs.items()])
            raise CompileError(f"{_where(gm, node)} fails on the example inputs: {first_line(err)}\n"
                               f"  it got: {got}") from err
