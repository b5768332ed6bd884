"""Capture with torch.export: the ATen training-IR graph of a model that fx cannot trace.

``torch.export.export(strict=False)`` runs the model's Python as it is (decorated
``*args, **kwargs`` forwards, data-dependent shapes, ``torch.fx.wrap``-ped functions), so Hugging
Face transformers 5, timm and torchvision models capture without edits.

The batch dimension of every tensor input, and every dimension of an integer one (token ids,
masks, positions), is ``Dim.AUTO``: export keeps it symbolic unless the model fixes it, so the
graph takes other batch sizes and sequence lengths than the example's. export fixes a dimension
whose example size is 1, so a batch of one is exported as a batch of two (the same rows twice),
and the graph then takes any batch size, 1 included. The other dimensions of float inputs (image
sizes...) are the example's: symbolic image sizes make export of a windowed model such as Swin
30x slower, and a call with another size fails export's guard, which names the dimension.

The unlifted module's parameters and buffers are the model's own objects, and its nodes carry
``nn_module_stack``, from which classify names ops by module path as it does for an fx trace.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from ..errors import CompileError, first_line

__all__ = ["capture_export"]


def _auto_dims(value: Any) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    return {i: Dim.AUTO for i in range(1 if value.is_floating_point() else value.dim())}


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """``Dim.AUTO`` dimensions (see the module docstring), keyed by forward's parameter names
    (None where forward takes ``*args``, which export's name-keyed specification cannot name)."""
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    if any(signature.parameters[name].kind == inspect.Parameter.VAR_POSITIONAL for name in bound.arguments):
        return None
    return {name: pytree.tree_map(_auto_dims, value) for name, value in bound.arguments.items()}


def _batch_of_two(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The inputs with every tensor repeated twice along its first dimension, where every tensor
    input has a first dimension of 1 (a batch of one); None otherwise."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not tensors or any(t.dim() == 0 or t.shape[0] != 1 for t in tensors):
        return None
    return pytree.tree_map_only(torch.Tensor, lambda t: torch.cat([t, t]), (args, kwargs))


def _export(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=_dynamic_shapes(model, args, kwargs))


def capture_export(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> torch.fx.GraphModule:
    """``model``'s ATen graph from ``torch.export.export(strict=False)`` as a plain GraphModule.

    Args:
        model: the module, in the mode (train or eval) whose code the graph is to run.
        args, kwargs: example inputs; the graph takes the same structure (positional and keyword).

    Raises:
        CompileError: export failed; the message has its first meaningful line.
    """
    # contiguous: with symbolic sizes, export's guards on a strided example fail on contiguous calls
    args, kwargs = pytree.tree_map_only(torch.Tensor, torch.Tensor.contiguous, (tuple(args), dict(kwargs)))
    program = None
    if (doubled := _batch_of_two(args, kwargs)) is not None:
        try:
            program = _export(model, *doubled)
        except Exception:  # a model that insists on a batch of one: export the example as it is
            program = None
    try:
        program = program or _export(model, args, kwargs)
    except Exception as err:  # export raises UserError, GuardOnDataDependentSymNode, TypeError...
        raise CompileError(f"torch.export cannot capture {type(model).__name__}: {first_line(err)}") from err
    unlifted = program.module()
    # a plain GraphModule: export's own refuses train()/eval(), which the passes and the user call
    return torch.fx.GraphModule(unlifted, unlifted.graph, class_name=type(model).__name__)
