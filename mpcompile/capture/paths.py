"""The three capture paths, and ``auto``'s choice among them.

- ``graph``: an ``fx.GraphModule`` given by the user is used as it is (a copy of its graph, so
  the passes' metadata never lands in the user's nodes).
- ``fx``: symbolic tracing (``capture_fx``).
- ``export``: ``torch.export.export(strict=False)`` (``capture_export``), for what fx cannot
  trace; it needs example inputs.

``fx`` traces into ``torch.fx.wrap``-ped functions, and keeps them opaque where their bodies do not
trace. ``auto`` takes ``graph`` for a GraphModule; otherwise fx into wrapped functions, then
export, then fx with wrapped functions opaque: the first that captures the model.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.nn as nn

from ..errors import CompileError, first_line
from .export import capture_export
from .fx import capture_fx
from .inputs import Inputs

__all__ = ["CAPTURES", "capture"]

CAPTURES = ("auto", "fx", "export", "graph")


def _as_is(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    return torch.fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)


def _fx(model: nn.Module, leaf_modules: tuple[type, ...], inputs: Inputs | None,
        into_wrapped: bool) -> torch.fx.GraphModule:
    given = None if inputs is None else len(inputs.args)
    named = frozenset() if inputs is None else frozenset(inputs.kwargs)
    return capture_fx(model, leaf_modules, given, named, into_wrapped)


def _export(model: nn.Module, inputs: Inputs, leaf_modules: tuple[type, ...]) -> torch.fx.GraphModule:
    gm = capture_export(model, inputs.args, inputs.kwargs)
    if leaf_modules:  # export has no leaves: what the user asked to run unchanged meets the policy
        warnings.warn(f"mpcompile: {type(model).__name__} was captured by torch.export, which does not keep "
                      f"leaf_modules ({', '.join(t.__name__ for t in leaf_modules)}) opaque: the ops inside them are "
                      f"captured and the policy applies to them; capture='fx' keeps them whole", stacklevel=5)
    return gm


def capture(model: nn.Module, how: str, inputs: Inputs | None,
            leaf_modules: tuple[type, ...] = ()) -> tuple[torch.fx.GraphModule, str]:
    """``model`` as a GraphModule, by the path ``how`` names, and the path taken.

    Args:
        model: the module, in the mode whose code the graph is to run.
        how: ``auto``, ``fx``, ``export`` or ``graph`` (see the module docstring).
        inputs: example inputs (export needs them; fx uses them to fix defaults).
        leaf_modules: module types fx keeps as opaque calls (export has no leaves: it warns).

    Raises:
        CompileError: the path cannot capture the model; for ``auto``, what each path said.
    """
    if how not in CAPTURES:
        raise CompileError(f"capture={how!r}: choose one of {', '.join(CAPTURES)}")
    if how == "graph" or (how == "auto" and isinstance(model, torch.fx.GraphModule)):
        if not isinstance(model, torch.fx.GraphModule):
            raise CompileError(f"capture='graph' takes a torch.fx.GraphModule, got {type(model).__name__}")
        return _as_is(model), "graph"
    if how == "export":
        if inputs is None:
            raise CompileError("capture='export' needs example inputs: pass example_inputs= (and example_kwargs=)")
        return _export(model, inputs, leaf_modules), "export"
    with contextlib.suppress(CompileError):  # a wrapped function's body that does not trace: the next path
        return _fx(model, leaf_modules, inputs, into_wrapped=True), "fx"
    if how == "auto" and inputs is not None:
        try:
            return _export(model, inputs, leaf_modules), "export"
        except CompileError as err:
            exported = err
    try:
        return _fx(model, leaf_modules, inputs, into_wrapped=False), "fx"
    except CompileError as err:
        if how == "fx":
            raise
        export = (f"export: {first_line(exported.__cause__ or exported)}" if inputs is not None else
                  "export: not tried: it needs example inputs (compile's example_inputs= / example_kwargs=)")
        raise CompileError(f"cannot capture {type(model).__name__}; tried:\n  fx: {str(err).splitlines()[0]}\n  "
                           f"{export}\n{_hint(err)}") from err


def _hint(err: CompileError) -> str:
    """fx's advice (which module to keep opaque), the lines after its first."""
    return "\n".join(str(err).splitlines()[1:])
