"""``compile``: run the pass list (``passes.pipeline.COMPILE``) over a model and a policy.

``CompiledModel`` is an ``nn.Module`` over the lowered graph. It shares the original model's
parameters and buffers (the same objects), and ``recompile`` re-runs assign and lower only
(``RECOMPILE``), so an optimizer built on its parameters keeps working across precision
changes. Its views (``table``, ``explain``, ``to_json``...) read the annotated graph only.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from .backends import check_backend
from .errors import CompileError, PolicyError
from .ops.registry import kind_named
from .passes import MpcMeta, PassState, mpc_meta, run_passes
from .passes.assign import level_of, unmatched_rules
from .passes.pipeline import COMPILE, RECOMPILE, STATS
from .policy import Policy, load_policy

__all__ = ["compile", "CompiledModel", "CompileError"]

class CompiledModel(nn.Module):
    """A model lowered under a policy. Call it like the original.

    Attributes:
        policy: the policy in force; level: its level; backend: which implementation computes
        the ops (``mpcompile.backends``); warnings: what the policy says and this model does not
        do (rules that match no op, roles an op lacks, GEMM work that runs in fp32...);
        annotated: the captured graph, each node's ``MpcMeta`` in ``node.meta["mpc"]``.
    """

    def __init__(self, state: PassState):
        super().__init__()
        self._state = state  # not a module: the traced graph stays out of the module tree
        self.graph_module, self.warnings = state.lowered, self._check()

    @property
    def policy(self) -> Policy:
        return self._state.policy

    @property
    def level(self) -> "int | str | Mapping[str, int | str]":
        return self._state.level

    @property
    def backend(self) -> str:
        return self._state.backend

    @property
    def annotated(self) -> torch.fx.GraphModule:
        """The captured graph with every pass's results in ``node.meta["mpc"]`` (an ``MpcMeta``)."""
        return self._state.traced

    def analysed(self) -> torch.fx.GraphModule:
        """Deprecated: ``annotated`` (statistics are collected by compile and ``collect_stats``)."""
        warnings.warn("CompiledModel.analysed() is deprecated: use CompiledModel.annotated, and collect_stats() "
                      "after a recompile", DeprecationWarning, stacklevel=2)
        return self.annotated

    def annotations(self) -> Iterator[tuple[torch.fx.Node, MpcMeta]]:
        """(node, its ``MpcMeta``) for every classified node of ``annotated``, in graph order."""
        for node in self.annotated.graph.nodes:
            meta = mpc_meta(node)
            if meta is not None and meta.classified:
                yield node, meta

    def recompile(self, policy: "Policy | Mapping | str | Path | None" = None,
                  level: "int | str | Mapping[str, int | str] | None" = None) -> None:
        """Re-assign formats (from a new policy and/or level) and re-lower; parameters are kept.
        ``level`` is one level for every op or a mapping from node names to levels (an op it does
        not name is at level 0). Format statistics belong to the previous assignment and are
        dropped: ``collect_stats`` measures the new one."""
        state = self._state
        if isinstance(level, Mapping):
            unknown = sorted(set(level) - {n.name for n, _ in self.annotations()})
            if unknown:
                raise CompileError(f"recompile(level=...): no op named {', '.join(map(repr, unknown))}; per-op levels "
                                   f"are keyed by node name (see CompiledModel.assignments())")
            level = dict(level)
        if policy is not None:
            state.policy = load_policy(policy)
        state.level = (0 if policy is not None else state.level) if level is None else level
        run_passes(RECOMPILE, state)
        self.graph_module, self.warnings = state.lowered, self._check()

    def collect_stats(self) -> None:
        """Measure the current assignment on the calibration batches (the stats pass): what the
        table and ``explain`` show as overflow / flush-to-zero shares and SQNR. Compile runs it;
        a recompile drops the previous results."""
        run_passes(STATS, self._state)

    @property
    def calibrated(self) -> bool:
        """Whether the model was compiled with calibration batches (condition and stats ran)."""
        return bool(self._state.batches)

    @property
    def stats_current(self) -> bool:
        """Whether the annotated graph holds statistics of the current assignment."""
        return any(m.sqnr_db is not None for _, m in self.annotations())

    def _check(self) -> list[str]:
        """Warnings (each also issued) on what the policy says and this model does not do: rules
        that match no op, roles an op does not have, GEMM work that runs in fp32, recompute where
        it does not apply."""
        texts = [f"{label}: matches no op of this model" for label in unmatched_rules(self.annotated, self.policy)]
        for node, meta in self.annotations():
            where = f"node {node.name} ({meta.op_type} '{meta.name}')"
            unapplied = self._unapplied(node, meta) if meta.unemulated else []
            if unapplied:
                texts.append(f"{where}: runs in fp32: {meta.unemulated}, so the policy's {', '.join(unapplied)} for it "
                             f"{'is' if len(unapplied) == 1 else 'are'} not applied; a rule that matches it with "
                             f"keep: fp32 says that this is intended")
            assignment = meta.assignment
            if assignment is None or meta.unemulated:
                continue
            skipped = [r for r, s in assignment.roles if s.quant is not None and r not in meta.roles]
            if skipped:
                texts.append(f"{where}: {', '.join(skipped)} not applied: this op's roles are {', '.join(meta.roles)}")
            if assignment.recompute is not None and not (meta.kind and kind_named(meta.kind).recomputes):
                texts.append(f"{where}: recompute not applied: it is for linear, conv, matmul and einsum ops")
        for text in texts:
            warnings.warn(f"mpcompile: {text}", stacklevel=4)
        return texts

    def _unapplied(self, node: torch.fx.Node, meta: MpcMeta) -> list[str]:
        """What the policy would set for a node of unemulated GEMM work if it were a GEMM-like op,
        and lowering does not apply: roles (an op's input and output roles are applied all the
        same) and emulated arithmetic."""
        would = self.policy.resolve(replace(meta.facts, group="gemm"), level_of(self.level, node))
        actual = meta.assignment
        applied = {r for r, s in actual.roles if s.quant is not None and r in meta.roles} if actual else set()
        return ([r for r, s in would.roles if s.quant is not None and r not in applied]
                + [f"{k} arithmetic" for k in ("forward", "backward") if not getattr(would, k).is_native])

    def forward(self, *args, **kwargs):
        try:
            return self.graph_module(*args, **kwargs)
        except AssertionError as err:  # fx's check of an argument traced at its default (_fixed_defaults)
            name, sep, _ = str(err).partition(" has been specialized to have value ")
            if not sep:
                raise
            raise CompileError(f"{type(self.annotated).__name__}.forward: argument {name!r} was traced at its default "
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
        return {node.name: (None if meta.kappa is None else meta.kappa.median, meta.assignment.unit_roundoff)
                for node, meta in self.annotations()
                if meta.assignment is not None and meta.assignment.unit_roundoff > 0}

    def assignments(self) -> dict[str, Any]:
        """Node name -> ``Assignment``, for every node the policy quantizes."""
        return {node.name: meta.assignment for node, meta in self.annotations() if meta.assignment is not None}

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
    policy = load_policy(policy)
    kappa_rules = [rule.label for rule in policy.rules if rule.match.needs_kappa]
    if kappa_rules and calibration is None and example_inputs is None:
        raise PolicyError(f"{kappa_rules[0]}: selects on kappa, which the condition pass estimates on data: "
                          f"give compile() calibration= batches or example_inputs")
    example_inputs = None if example_inputs is None else tuple(example_inputs)
    batches = [example_inputs] if calibration is None and example_inputs is not None else \
        [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calibration or ()]
    state = PassState(model, policy, level, tuple(leaf_modules), example_inputs, batches, check_backend(backend))
    return CompiledModel(run_passes(COMPILE, state))
