"""``compile``: trace a model, assign formats from a policy, lower to ``mpc::`` ops.

``CompiledModel`` is an ``nn.Module`` over the lowered graph. It shares the original model's
parameters and buffers (the same objects), and ``recompile`` re-runs assign and lower only,
so an optimizer built on its parameters keeps working across precision changes.
"""
from __future__ import annotations

import functools
import inspect
import linecache
import math
import traceback
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from .backends import check_backend
from .errors import MpcompileError, PolicyError
from .passes import assign_formats, classify, collect_stats, estimate_condition, lower, propagate_shapes
from .passes.assign import unmatched_rules
from .passes.classify import ATTENTION_KINDS
from .policy import Policy, load_policy
from .traceable import TRACEABLE_FORWARDS

__all__ = ["compile", "CompiledModel", "CompileError"]


class CompileError(MpcompileError, ValueError):
    """A model that cannot be traced or lowered; the message says where and what to do."""


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


def _fixed_defaults(model: nn.Module, given: int | None) -> dict[str, Any]:
    """forward's parameters that the trace fixes to their defaults: those defaulting to None or a
    bool beyond the ``given`` positional inputs (None: the required ones, at least one). As
    placeholders, fx would trace ``if mask is None`` as false and ``if flag`` not at all; fixed,
    the graph asserts at run time that the same value comes."""
    params = list(inspect.signature(model.forward).parameters.values())
    if given is None:
        given = max(1, sum(p.default is inspect.Parameter.empty for p in params))
    return {p.name: p.default for i, p in enumerate(params)
            if (i >= given or p.kind == p.KEYWORD_ONLY) and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and (p.default is None or isinstance(p.default, bool))}


def _trace(model: nn.Module, leaf_modules: tuple[type, ...], given: int | None = None) -> torch.fx.GraphModule:
    cls = type(model)
    if cls in TRACEABLE_FORWARDS and not isinstance(model, leaf_modules):  # the tracer calls the root's forward itself
        model.__class__ = type(cls.__name__, (cls,), {"forward": TRACEABLE_FORWARDS[cls]})
    try:
        graph = _Tracer(leaf_modules).trace(model, concrete_args=_fixed_defaults(model, given) or None)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError... with the failing line in its traceback
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
        raise CompileError(f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}\n"
                           f"    at {where}\n  {hint}") from err
    finally:
        model.__class__ = cls
    return torch.fx.GraphModule(model, graph, class_name=cls.__name__)


class CompiledModel(nn.Module):
    """A model lowered under a policy. Call it like the original.

    Attributes:
        policy: the policy in force; level: its level; warnings: rules that matched no op;
        backend: which implementation computes the ops (``mpcompile.backends``).
    """

    def __init__(self, traced: torch.fx.GraphModule, policy: Policy, level: "int | str", batches: list[tuple],
                 backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)
        self._traced = [traced]  # analysis results live on its nodes; a list keeps it out of the module tree
        self._batches, self._stats_current = batches, False
        self.policy, self.level, self.warnings = policy, level, []
        self.recompile(policy, level)
        self.analysed()

    def analysed(self) -> torch.fx.GraphModule:
        """The traced graph with every pass's results in ``node.meta["mpc"]``. Format statistics
        of the current assignment are collected here, on the calibration batches, the first time
        they are asked for after a compile or recompile (so a recompile itself stays cheap)."""
        traced = self._traced[0]
        if self._batches and not self._stats_current:
            collect_stats(traced, self.graph_module, self._batches)
        self._stats_current = True
        return traced

    def recompile(self, policy: "Policy | Mapping | str | Path | None" = None,
                  level: "int | str | Mapping[str, int | str] | None" = None) -> None:
        """Re-assign formats (from a new policy and/or level) and re-lower; parameters are kept.
        ``level`` is one level for every op or a mapping from node names to levels (an op it does
        not name is at level 0). Format statistics are dropped and re-collected when next asked
        for (``analysed``)."""
        self.policy = self.policy if policy is None else load_policy(policy)
        if isinstance(level, Mapping):
            unknown = sorted(set(level) - {n.name for n in self._traced[0].graph.nodes if "facts" in n.meta.get("mpc", {})})
            if unknown:
                raise CompileError(f"recompile(level=...): no op named {', '.join(map(repr, unknown))}; per-op levels "
                                   f"are keyed by node name (see CompiledModel.assignments())")
            level = dict(level)
        self.level = (0 if policy is not None else self.level) if level is None else level
        traced, self._stats_current = self._traced[0], False
        for node in traced.graph.nodes:
            node.meta.get("mpc", {}).pop("stats", None)
        assign_formats(traced, self.policy, self.level)
        self.graph_module = lower(traced, self.backend)
        self.warnings = [f"{label}: matches no op of this model" for label in unmatched_rules(traced, self.policy)]
        for node in traced.graph.nodes:
            mpc = node.meta.get("mpc", {})
            unapplied = self._unapplied(node) if "unemulated" in mpc else []
            if unapplied:
                self.warnings.append(f"node {node.name} ({mpc['facts'].op_type} '{mpc['facts'].name}'): runs in fp32: "
                                     f"{mpc['unemulated']}, so the policy's {', '.join(unapplied)} for it "
                                     f"{'is' if len(unapplied) == 1 else 'are'} not applied; a rule that matches it "
                                     f"with keep: fp32 says that this is intended")
            assignment = mpc.get("assignment")
            if assignment is not None and "unemulated" not in mpc:
                skipped = [r for r, s in assignment.roles if s.quant is not None and r not in mpc["roles"]]
                if skipped:
                    self.warnings.append(f"node {node.name} ({mpc['facts'].op_type} '{mpc['facts'].name}'): "
                                         f"{', '.join(skipped)} not applied: this op's roles are "
                                         f"{', '.join(mpc['roles'])}")
                if assignment.recompute is not None and mpc.get("gemm") in (None, *ATTENTION_KINDS):
                    self.warnings.append(f"node {node.name} ({mpc['facts'].op_type} '{mpc['facts'].name}'): "
                                         f"recompute not applied: it is for linear, conv and matmul ops, whose "
                                         f"output components are single dot products")
        for text in self.warnings:
            warnings.warn(f"mpcompile: {text}", stacklevel=3)

    def _unapplied(self, node: torch.fx.Node) -> list[str]:
        """What the policy would set for a node of unemulated GEMM work if it were a GEMM-like op,
        and lowering does not apply: roles (an op's input and output roles are applied all the
        same) and emulated arithmetic."""
        mpc = node.meta["mpc"]
        level = self.level.get(node.name, 0) if isinstance(self.level, Mapping) else self.level
        would = self.policy.resolve(replace(mpc["facts"], group="gemm"), level)
        actual = mpc.get("assignment")
        applied = {r for r, s in actual.roles if s.quant is not None and r in mpc["roles"]} if actual else set()
        return ([r for r, s in would.roles if s.quant is not None and r not in applied]
                + [f"{k} arithmetic" for k in ("forward", "backward") if not getattr(would, k).is_native])

    def forward(self, *args, **kwargs):
        try:
            return self.graph_module(*args, **kwargs)
        except AssertionError as err:  # fx's check of an argument traced at its default (_fixed_defaults)
            name, sep, _ = str(err).partition(" has been specialized to have value ")
            if not sep:
                raise
            raise CompileError(f"{type(self._traced[0]).__name__}.forward: argument {name!r} was traced at its default "
                               f"(it was not among compile()'s example inputs) and now has another value; pass it "
                               f"in example_inputs to compile() to trace it as an input") from err

    def table(self) -> str:
        """A text table of every GEMM-like or quantized op: formats, arithmetic, deciding rules."""
        from .views import table
        return table(self)

    def explain(self, name: str) -> str:
        """Every policy section that applied to op ``name`` (qualified or node name), and the result."""
        from .views import explain
        return explain(self, name)

    def to_json(self) -> str:
        """The resolved assignment as a policy (JSON is YAML): loading it reproduces this model."""
        from .views import to_json
        return to_json(self)

    def to_networkx(self):
        """The graph as a networkx DiGraph with each op's formats, arithmetic and bits."""
        from .views import to_networkx
        return to_networkx(self)

    def to_dot(self) -> str:
        """Graphviz DOT text of the graph, each op coloured by its operand bits."""
        from .views import to_dot
        return to_dot(self)

    def save_svg(self, path: "str | Path") -> None:
        """Write the graph as SVG (self-contained; Graphviz is not needed)."""
        from .views import to_svg
        Path(path).write_text(to_svg(self))

    def error_terms(self) -> dict[str, tuple[float | None, float]]:
        """Node name -> (kappa, unit roundoff) of every op whose forward pass rounds anything:
        the condition pass's median kappa (None without calibration data or for an op it does not
        estimate) and ``Assignment.unit_roundoff``. What a first-order error estimate reads."""
        terms = {}
        for node in self._traced[0].graph.nodes:
            mpc = node.meta.get("mpc", {})
            if "assignment" in mpc and mpc["assignment"].unit_roundoff > 0:
                kappa = mpc.get("kappa", {}).get("median")
                terms[node.name] = (kappa, mpc["assignment"].unit_roundoff)
        return terms

    def assignments(self) -> dict[str, Any]:
        """Node name -> ``Assignment``, for every node the policy quantizes."""
        return {n.name: n.meta["mpc"]["assignment"] for n in self._traced[0].graph.nodes
                if "assignment" in n.meta.get("mpc", {})}

    def low_precision_counts(self) -> dict[str, tuple[int, int]]:
        """Node name -> (output components computed in the low arithmetic, output components), for
        every op with ``recompute``: summed over the forward calls since the last compile,
        recompile or ``reset_low_precision_counts`` (training calls included; calibration not)."""
        counts = getattr(self.graph_module, "_mpc_counts", None)
        if counts is None:
            return {}
        return {name: (int(c[0]), int(c[1])) for name, c in counts.named_buffers()}

    def low_precision_fraction(self) -> dict[str, float]:
        """Node name -> the fraction of output components computed in the low arithmetic, for
        every op with ``recompute`` (see ``low_precision_counts``; NaN before its first call)."""
        return {name: low / total if total else math.nan for name, (low, total) in self.low_precision_counts().items()}

    def reset_low_precision_counts(self) -> None:
        """Set every op's count of low-precision components back to zero."""
        counts = getattr(self.graph_module, "_mpc_counts", None)
        if counts is not None:
            with torch.no_grad():
                for c in counts.buffers():
                    c.zero_()


def compile(model: nn.Module, policy: "Policy | Mapping | str | Path", example_inputs: Iterable | None = None, *,
            leaf_modules: Iterable[type] = (), calibration: Iterable | None = None,
            level: "int | str" = 0, backend: str = "auto") -> CompiledModel:
    """Trace ``model`` with torch.fx and lower it under ``policy``.

    Args:
        model: any module torch.fx can trace (or whose untraceable parts are ``leaf_modules``).
        policy: a ``Policy``, a mapping, a path to a YAML file, a shipped policy's name
            (``"hfp8"``), or YAML text.
        example_inputs: positional inputs; when given, shapes and dtypes are recorded per node.
            forward's parameters that default to None or a bool and that these do not give
            (without them: that are not required) are fixed to their defaults in the trace.
        leaf_modules: module types kept as opaque calls (they run unchanged).
        calibration: batches (a tensor or a tuple of forward's arguments each) on which the
            condition and stats passes run; default: ``example_inputs`` as one batch.
        level: the policy level to start at (or a mapping from node names to levels).
        backend: ``auto`` (Triton kernels for CUDA tensors, the torch reference elsewhere),
            ``torch`` or ``triton`` (on the CPU only in Triton's interpreter); the numbers are
            the same. See ``mpcompile.backends``.
    """
    policy, backend = load_policy(policy), check_backend(backend)
    kappa_rules = [rule.label for rule in policy.rules if rule.match.needs_kappa]
    if kappa_rules and calibration is None and example_inputs is None:
        raise PolicyError(f"{kappa_rules[0]}: selects on kappa, which the condition pass estimates on data: "
                          f"give compile() calibration= batches or example_inputs")
    if example_inputs is not None:
        example_inputs = tuple(example_inputs)
    calibration = None if calibration is None else list(calibration)
    first = example_inputs if example_inputs is not None else calibration[0] if calibration else None
    traced = _trace(model, tuple(leaf_modules),
                    None if first is None else len(first) if isinstance(first, (tuple, list)) else 1)
    if example_inputs is not None:
        propagate_shapes(traced, example_inputs)
    classify(traced)
    batches = [example_inputs] if calibration is None and example_inputs is not None else \
        [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calibration or ()]
    if batches:
        estimate_condition(traced, batches)
    return CompiledModel(traced, policy, level, batches, backend)
