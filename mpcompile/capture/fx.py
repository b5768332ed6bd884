"""Capture with torch.fx: symbolic tracing with opaque leaf modules and traceable forwards.

Functions that libraries hide from fx with ``torch.fx.wrap`` (torchvision's
``shifted_window_attention``...) can be traced into, so the GEMMs inside them meet the policy;
kept opaque, they are one call whose GEMMs the coverage pass reports.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import linecache
import traceback
from typing import Any, Iterator

import torch
import torch.fx._symbolic_trace as fx_trace
import torch.nn as nn

from ..errors import CompileError
from .traceable import TRACEABLE_FORWARDS

__all__ = ["capture_fx", "traced_defaults"]


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer, with the given module types kept as opaque calls, and torch.nn
    modules that have a ``TRACEABLE_FORWARDS`` entry traced through it."""

    def __init__(self, leaf_modules: tuple[type, ...]):
        super().__init__()
        self.leaves = leaf_modules

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaves):
            return True
        return type(m) not in TRACEABLE_FORWARDS and super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if type(m) in TRACEABLE_FORWARDS and not isinstance(m, self.leaves):
            forward = functools.partial(TRACEABLE_FORWARDS[type(m)], m)
        return super().call_module(m, forward, args, kwargs)


def traced_defaults(model: nn.Module, given: int | None, named: frozenset[str] = frozenset()) -> dict[str, Any]:
    """forward's parameters that the trace fixes to their defaults: those defaulting to None or a
    bool beyond the ``given`` positional inputs (None: the required ones, at least one) and not
    ``named`` by keyword inputs. As placeholders, fx would trace ``if mask is None`` as false and
    ``if flag`` not at all; fixed, the graph asserts at run time that the same value comes."""
    params = list(inspect.signature(model.forward).parameters.values())
    if given is None:
        given = max(1, sum(p.default is inspect.Parameter.empty for p in params))
    return {p.name: p.default for i, p in enumerate(params)
            if (i >= given or p.kind == p.KEYWORD_ONLY) and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in named and (p.default is None or isinstance(p.default, bool))}


@contextlib.contextmanager
def _into_wrapped_functions() -> Iterator[None]:
    """Trace into ``torch.fx.wrap``-ped functions (fx's own helpers stay wrapped)."""
    functions, methods = dict(fx_trace._wrapped_fns_to_patch), list(fx_trace._wrapped_methods_to_patch)
    fx_trace._wrapped_fns_to_patch.clear()
    fx_trace._wrapped_fns_to_patch.update({key: scope for key, scope in functions.items()
                                           if scope.get("__name__", "").startswith("torch.fx")})
    fx_trace._wrapped_methods_to_patch.clear()
    try:
        yield
    finally:
        fx_trace._wrapped_fns_to_patch.clear()
        fx_trace._wrapped_fns_to_patch.update(functions)
        fx_trace._wrapped_methods_to_patch[:] = methods


def capture_fx(model: nn.Module, leaf_modules: tuple[type, ...], given: int | None = None,
               named: frozenset[str] = frozenset(), into_wrapped: bool = True) -> torch.fx.GraphModule:
    """``model`` traced into a GraphModule.

    Args:
        model: the module to trace.
        leaf_modules: module types kept as opaque calls.
        given, named: how many positional inputs the example inputs give and which keyword
            inputs they name (see ``traced_defaults``).
        into_wrapped: trace into ``torch.fx.wrap``-ped functions (else they stay opaque calls).

    Raises:
        CompileError: fx cannot trace it; the message names the line and says what to do.
    """
    cls = type(model)
    if cls in TRACEABLE_FORWARDS and not isinstance(model, leaf_modules):  # the tracer calls the root's forward itself
        model.__class__ = type(cls.__name__, (cls,), {"forward": TRACEABLE_FORWARDS[cls]})
    try:
        with _into_wrapped_functions() if into_wrapped else contextlib.nullcontext():
            graph = _Tracer(leaf_modules).trace(model, concrete_args=traced_defaults(model, given, named) or None)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError... with the failing line in its traceback
        raise CompileError(_trace_failure(model, err)) from err
    finally:
        model.__class__ = cls
    return torch.fx.GraphModule(model, graph, class_name=cls.__name__)


def _trace_failure(model: nn.Module, err: Exception) -> str:
    """What fx could not trace, where (the user's line) and which module to keep opaque."""
    frames = list(traceback.walk_tb(err.__traceback__))
    user = [(f, line) for f, line in frames if "torch/fx" not in f.f_code.co_filename.replace("\\", "/")]
    where = "(no source line)"
    if user:
        frame, lineno = user[-1]
        where = f"{frame.f_code.co_filename}:{lineno}: {linecache.getline(frame.f_code.co_filename, lineno).strip()}"
    owners = [f.f_locals.get("self") for f, _ in user if f.f_code.co_name == "forward"]
    owner = next((m for m in reversed(owners) if isinstance(m, nn.Module) and m is not model), None)
    hint = (f"pass leaf_modules=({type(owner).__name__},) to keep that module opaque (it then runs as it is)"
            if owner is not None else "keep the untraceable code in a submodule and pass its class as leaf_modules=")
    return f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}\n    at {where}\n  {hint}"
