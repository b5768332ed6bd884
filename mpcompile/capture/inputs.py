"""Example inputs as a model takes them (positional and keyword), and as a captured graph's
placeholders take them (``flat_inputs``: what ``torch.fx.Interpreter.run`` is given)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch.fx._pytree import tree_flatten_spec
from torch.utils._pytree import tree_map_only

from ..errors import CompileError

__all__ = ["Inputs", "as_inputs", "flat_inputs"]


@dataclass(frozen=True)
class Inputs:
    """One call's arguments: ``model(*args, **kwargs)``."""

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def floats_as(self, dtype: torch.dtype) -> "Inputs":
        """These inputs with every floating-point tensor cast to ``dtype``."""
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
        args, kwargs = tree_map_only(torch.Tensor, cast, (self.args, dict(self.kwargs)))
        return Inputs(tuple(args), kwargs)


def as_inputs(batch: Any) -> Inputs:
    """A calibration batch as ``Inputs``: a tensor (one argument), a tuple or list (positional
    arguments), a mapping (keyword arguments, as a tokenizer returns them) or ``Inputs``."""
    if isinstance(batch, Inputs):
        return batch
    if isinstance(batch, Mapping):
        return Inputs((), dict(batch))
    return Inputs(tuple(batch) if isinstance(batch, (tuple, list)) else (batch,))


def flat_inputs(gm: torch.fx.GraphModule, inputs: Inputs) -> tuple:
    """``inputs`` as ``gm``'s placeholders take them, in order.

    An exported graph flattens its inputs by its ``_in_spec``; a traced one takes forward's
    parameters, a keyword argument at its parameter's place and a default where neither gives a
    value.

    Raises:
        CompileError: the inputs do not fit the graph's parameters.
    """
    if getattr(gm, "_in_spec", None) is not None:
        try:
            return tuple(tree_flatten_spec((list(inputs.args), dict(inputs.kwargs)), gm._in_spec))
        except Exception as err:
            raise CompileError(f"inputs {_describe(inputs)} do not match the captured graph's "
                               f"({gm._in_spec}): {err}") from err
    signature = inspect.signature(gm.forward)  # fx writes forward with one parameter per placeholder
    try:
        bound = signature.bind(*inputs.args, **inputs.kwargs)
    except TypeError as err:
        raise CompileError(f"inputs {_describe(inputs)} do not match forward's parameters "
                           f"({', '.join(signature.parameters)}): {err}") from err
    bound.apply_defaults()
    return bound.args


def _describe(inputs: Inputs) -> str:
    return f"({len(inputs.args)} positional{', ' + ', '.join(inputs.kwargs) if inputs.kwargs else ''})"
