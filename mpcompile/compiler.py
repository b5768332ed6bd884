"""``compile``: capture a model, run the pass list (``passes.pipeline.COMPILE``) under a policy.

``CompiledModel`` is an ordinary ``nn.Module`` around the lowered graph: its modules,
parameters and buffers are the source model's (the same objects, so its ``state_dict`` has the
source's keys and an optimizer built on its parameters keeps working across precision changes);
attributes it lacks fall through to the source model; it pickles and deep-copies. Each train /
eval mode is captured the first time it runs, so the compiled model never runs the other mode's
code. ``recompile`` re-runs assign and lower (``RECOMPILE``), and measures again where it
changes the formats of a calibrated model (``RECALIBRATE``). Its views (``table``,
``explain``, ``to_json``...) read the annotated graph only.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from .backends import check_backend
from .capture import Inputs, as_inputs
from .errors import CompileError, PolicyError
from .formats import fits_dtype
from .ops.registry import kind_named
from .passes import MpcMeta, PassState, mpc_meta, run_passes
from .passes.assign import level_of
from .passes.audit import setting_warnings
from .passes.pipeline import ASSIGN, CAPTURE, COMPILE, CONDITION, LOWER, RECALIBRATE, RECOMPILE, SHAPE, STATS
from .passes.source_modules import stale_reads
from .policy import Policy, load_policy

__all__ = ["compile", "CompiledModel", "CompileError"]

_GRAPH_STATE = ("_mpc_amax",)  # modules lowering keeps on the traced graph, state a pickle must carry


class CompiledModel(nn.Module):
    """A model lowered under a policy. Call it like the original.

    Attributes:
        source: the model it was compiled from (its modules and parameters are this module's).
        policy: the policy in force; level: its level; backend: which implementation computes
        the ops (``mpcompile.backends``); capture: the capture path taken (``fx``, ``export``,
        ``graph``); warnings: what the policy says and this model does not do (rules that match
        no op, roles an op lacks, GEMM work that runs in fp32...); annotated: the captured graph
        of the current mode, each node's ``MpcMeta`` in ``node.meta["mpc"]``.
    """

    def __init__(self, state: PassState, strict: bool = False):
        super().__init__()
        source = state.model
        # the source's own dicts: its state_dict keys, .to(), .train() and parameters() are this module's
        self.__dict__.update(_source=source, _modules=source._modules, _parameters=source._parameters,
                             _buffers=source._buffers, _non_persistent_buffers_set=source._non_persistent_buffers_set)
        self.training = source.training
        self._strict = strict
        self._states: dict[bool, PassState] = {source.training: state}
        self._warnings: dict[bool, list[str]] = {source.training: self._check(state)}
        self._compiled_dtype = next(source.parameters(), torch.empty(0)).dtype
        self._dtypes_warned: set[tuple[bool, torch.dtype]] = set()

    @property
    def source(self) -> nn.Module:
        return self._source

    @property
    def _state(self) -> PassState:
        """The state of the current mode, or of the mode captured first while this one has not run."""
        return self._states.get(self._source.training) or next(iter(self._states.values()))

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The lowered graph of the current mode (see ``_state``)."""
        return self._state.lowered

    @property
    def mode_captured(self) -> bool:
        """Whether the current mode (train or eval) has its own lowered graph (its first call captures it)."""
        return self._source.training in self._states

    @property
    def warnings(self) -> list[str]:
        return list(dict.fromkeys(w for texts in self._warnings.values() for w in texts))

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
    def capture(self) -> str:
        return self._state.capture

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes captured so far (``train``, ``eval``)."""
        return tuple("train" if mode else "eval" for mode in self._states)

    @property
    def annotated(self) -> torch.fx.GraphModule:
        """The captured graph with every pass's results in ``node.meta["mpc"]`` (an ``MpcMeta``)."""
        return self._state.traced

    def analysed(self) -> torch.fx.GraphModule:
        """Deprecated: ``annotated`` (statistics are collected by compile and ``collect_stats``)."""
        warnings.warn("CompiledModel.analysed() is deprecated: use CompiledModel.annotated, and collect_stats() "
                      "after a recompile", DeprecationWarning, stacklevel=2)
        return self.annotated

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            source = self.__dict__.get("_source")
            if source is None:
                raise
        value = getattr(source, name)
        if inspect.ismethod(value) and value.__self__ is source:
            # it would call the source's own forward: the uncompiled model, in fp32
            raise AttributeError(f"CompiledModel.{name}: {type(source).__name__}.{name} is a method of the source "
                                 f"model and would run it uncompiled; call cm.source.{name}(...) if that is meant")
        return value

    def train(self, mode: bool = True) -> "CompiledModel":
        self._source.train(mode)
        self.training = mode
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> "CompiledModel":
        super()._apply(fn, recurse)  # the source's modules, parameters and buffers
        for state in self._states.values():  # and what lowering keeps on the graphs (a shared tensor is done: fn is a no-op)
            for module in (state.traced, state.lowered):
                module._apply(fn, recurse)
        return self

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` (the source model's keys). With ``assign``, new tensor
        objects replace the source's, so every mode is captured again around them (its analysis
        and assignments kept)."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:
            self._states = {mode: _restore(self._source, mode, _snapshot(state)) for mode, state in self._states.items()}
        return result

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "__class__" and _is_fsdp(value):  # fully_shard(cm): its graphs must read what FSDP2 gathers
            for state in self._states.values():
                _check_live_reads(state)
        super().__setattr__(name, value)

    def __getstate__(self) -> dict:
        """Everything but the graphs, which are not picklable with their metadata: each mode's
        analysis (``MpcMeta`` by node name) and graph state (amax histories) instead."""
        saved = dict(self.__dict__)
        saved["_states"] = {mode: _snapshot(state) for mode, state in self._states.items()}
        return saved

    def __setstate__(self, saved: dict) -> None:
        self.__dict__.update(saved)
        self._states = {mode: _restore(self._source, mode, snapshot) for mode, snapshot in saved["_states"].items()}

    def annotations(self) -> Iterator[tuple[torch.fx.Node, MpcMeta]]:
        """(node, its ``MpcMeta``) for every classified node of ``annotated``, in graph order."""
        return _annotations(self.annotated)

    def recompile(self, policy: "Policy | Mapping | str | Path | None" = None,
                  level: "int | str | Mapping[str, int | str] | None" = None) -> None:
        """Re-assign formats (from a new policy and/or level) and re-lower; parameters are kept.
        ``level`` is one level for every op or a mapping from node names to levels (an op it does
        not name is at level 0). Every captured mode is recompiled. Where formats change and the
        model was compiled with calibration batches, kappa is estimated again on them (with the
        parameters of now; kappa rules may then match other ops) and the new formats' statistics
        measured; otherwise statistics of the previous assignment are dropped."""
        if isinstance(level, Mapping):
            names = {n.name for s in self._states.values() for n in s.traced.graph.nodes}
            unknown = sorted(set(level) - names)
            if unknown:
                raise CompileError(f"recompile(level=...): no op named {', '.join(map(repr, unknown))}; per-op levels "
                                   f"are keyed by node name (see CompiledModel.assignments())")
            level = dict(level)
        policy = None if policy is None else load_policy(policy)
        for mode, state in self._states.items():
            state.policy = policy or state.policy
            state.level = (0 if policy is not None else state.level) if level is None else level
            before = _effects(state)
            run_passes((ASSIGN,), state)
            run_passes(RECALIBRATE if state.batches and _effects(state) != before else (LOWER,), state)
            self._warnings[mode] = self._check(state, issued=self.warnings)

    def collect_stats(self) -> None:
        """Measure the current assignment on the calibration batches (the stats pass): what the
        table and ``explain`` show as overflow / flush-to-zero shares and SQNR. Compile runs it;
        a recompile drops the previous results."""
        for state in self._states.values():
            run_passes(STATS, state)

    @property
    def calibrated(self) -> bool:
        """Whether the model was compiled with calibration batches (condition and stats ran)."""
        return bool(self._state.batches)

    @property
    def stats_current(self) -> bool:
        """Whether the annotated graph holds statistics of the current assignment."""
        return any(m.sqnr_db is not None for _, m in self.annotations())

    def _check(self, state: PassState, issued: Iterable[str] = ()) -> list[str]:
        """Warnings (each also issued) on what the policy says and this model does not do: the
        settings ``setting_warnings`` finds without effect, roles an op does not have, GEMM work
        that runs in fp32, recompute where it does not apply. Those ``issued`` already (by
        another mode or an earlier compile of it) are not issued again.

        Raises:
            CompileError: under ``strict``, GEMM work runs in fp32 where the policy quantizes."""
        texts = setting_warnings(state.traced, state.policy, bool(state.batches))
        uncovered = []
        for node, meta in _annotations(state.traced):
            where = f"node {node.name} ({meta.op_type} '{meta.name}')"
            unapplied = self._unapplied(state, node, meta) if meta.unemulated else []
            if unapplied:
                uncovered.append(f"{where}: {meta.unemulated}")
                texts.append(f"{where}: runs in fp32: {meta.unemulated}, so the policy's {', '.join(unapplied)} for it "
                             f"{'is' if len(unapplied) == 1 else 'are'} not applied; a rule that matches it with "
                             f"keep: fp32 says that this is intended")
            assignment = meta.assignment
            if assignment is None or meta.unemulated:
                continue
            skipped = [r for r, s in assignment.roles if s.quant is not None and r not in meta.roles]
            if skipped:
                texts.append(f"{where}: {', '.join(skipped)} not applied: this op's roles are {', '.join(meta.roles)}")
            emulated = [k for k in ("forward", "backward") if not getattr(assignment, k).is_native]
            if emulated and meta.group != "gemm":
                texts.append(f"{where}: {' and '.join(emulated)} arithmetic not applied: it is for GEMM-like ops, "
                             f"and this {meta.group} op runs in torch's arithmetic with its roles rounded")
            if assignment.recompute is not None and not (meta.kind and kind_named(meta.kind).recomputes):
                texts.append(f"{where}: recompute not applied: it is for linear, conv, matmul and einsum ops")
        if uncovered and (self._strict or state.policy.strict):
            raise CompileError("strict: GEMM work runs in fp32 where the policy quantizes it:\n  " + "\n  ".join(uncovered)
                               + "\n  keep it in fp32 with a rule (keep: fp32) or make its code traceable")
        issued = set(issued)
        for text in (t for t in texts if t not in issued):
            warnings.warn(f"mpcompile: {text}", stacklevel=5)
        return texts

    @staticmethod
    def _unapplied(state: PassState, node: torch.fx.Node, meta: MpcMeta) -> list[str]:
        """What the policy would set for a node of unemulated GEMM work if it were a GEMM-like op,
        and lowering does not apply: roles (an op's input and output roles are applied all the
        same) and emulated arithmetic."""
        would = state.policy.resolve(replace(meta.facts, group="gemm"), level_of(state.level, node))
        actual = meta.assignment
        applied = {r for r, s in actual.roles if s.quant is not None and r in meta.roles} if actual else set()
        return ([r for r, s in would.roles if s.quant is not None and r not in applied]
                + [f"{k} arithmetic" for k in ("forward", "backward") if not getattr(would, k).is_native])

    def forward(self, *args, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            _check_unsharded(self._source)
        mode = self._source.training
        state = self._states.get(mode)
        param = next(self._source.parameters(), None)
        if state is None:  # this mode's first call: capture its code (never run the other mode's)
            first = next(iter(self._states.values()))
            inputs, calibration = first.inputs or Inputs(args, kwargs), first.calibration
            if param is not None and param.dtype != self._compiled_dtype:  # cast since compile (FSDP2's param_dtype)
                inputs, calibration = inputs.floats_as(param.dtype), tuple(b.floats_as(param.dtype) for b in calibration)
            state = replace(first, inputs=inputs, calibration=calibration, traced=None, lowered=None)
            if first.capture == "graph":
                warnings.warn(f"mpcompile: {type(self._source).__name__} was given as a GraphModule and is used as it "
                              f"is: its code, traced in one mode, runs in {'train' if mode else 'eval'} mode too; "
                              f"compile the source module to capture each mode's own code", stacklevel=2)
            self._states[mode] = _capture_mode(first, state)
            if _is_fsdp(type(self)):
                _check_live_reads(state)
            self._warnings[mode] = self._check(state, issued=self.warnings)
        if param is not None and param.dtype != self._compiled_dtype and (mode, param.dtype) not in self._dtypes_warned:
            self._dtypes_warned.add((mode, param.dtype))
            _warn_narrower_parameters(state, self._compiled_dtype, param.dtype)
        try:
            return state.lowered(*args, **kwargs)
        except TypeError:  # binding the arguments on every call would cost a small model a third of its forward
            _check_call(self._source, state.lowered, args, kwargs)
            raise
        except AssertionError as err:  # fx's check of an argument traced at its default (_fixed_defaults)
            if str(err).startswith("Guard failed"):  # an exported graph's guard on its inputs' shapes
                raise CompileError(f"{type(self._source).__name__} was captured by torch.export for inputs of other "
                                   f"shapes: {str(err).splitlines()[0]}; compile it with example inputs of the "
                                   f"shapes it is called with (export keeps batch sizes and integer inputs' "
                                   f"sizes symbolic, not float inputs' other sizes)") from err
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

    def graph_state_dict(self) -> dict[str, torch.Tensor]:
        """What the lowered graphs keep besides the model's own state (which ``state_dict`` holds):
        each delayed-scaling op's amax history (``_mpc_amax.<node>``), one for all modes. A
        checkpoint needs it for a resumed run to scale as the uninterrupted one did."""
        return {f"{name}.{key}": value for name, module in _held(self._state.traced).items()
                for key, value in module.state_dict().items()}

    def load_graph_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put back ``graph_state_dict`` (of this model, as saved): every saved history, also of an
        op the current formats do not scale late (a run that changed levels keeps those for its
        next recompile, and so does the resumed one).

        Raises:
            CompileError: a saved history of an op this model does not have.
        """
        nodes = {n.name for s in self._states.values() for n in s.traced.graph.nodes}
        for key, value in state.items():
            name, _, node = key.partition(".")
            if name not in _GRAPH_STATE or node not in nodes:
                raise CompileError(f"load_graph_state_dict: {key!r} is not this model's: its graph state holds "
                                   f"{', '.join(f'{n}.<node>' for n in _GRAPH_STATE)} of the nodes of its graph; load "
                                   f"a graph state saved from this model")
            module = self._graph_state_module(name)
            if node in module._buffers:
                module._buffers[node].copy_(value)
            else:
                module.register_buffer(node, value.to(next(self.parameters(), value).device, copy=True))

    def _graph_state_module(self, name: str) -> nn.Module:
        """The module ``name`` of ``_GRAPH_STATE`` that every mode's traced graph holds (made if none has it)."""
        traced = [s.traced for s in self._states.values()]
        module = next((getattr(t, name) for t in traced if hasattr(t, name)), None) or nn.Module()
        for t in traced:
            setattr(t, name, module)
        return module

    def condition_estimates(self) -> dict[str, Any]:
        """Node name -> the condition pass's ``KappaSummary``, for every op it estimated: what
        kappa rules selected with (a checkpoint keeps them, see ``load_condition_estimates``)."""
        return {node.name: meta.kappa for node, meta in self.annotations() if meta.kappa is not None}

    def load_condition_estimates(self, estimates: Mapping[str, Any]) -> None:
        """Put back ``condition_estimates`` (of this model, as saved) in every captured mode and
        assign and lower again, so that kappa rules select what they selected then."""
        for state in self._states.values():
            for node, meta in _annotations(state.traced):
                meta.kappa = estimates.get(node.name)
            run_passes(RECOMPILE, state)

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


def _check_call(source: nn.Module, lowered: torch.fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Raise TypeError, saying what the graph takes, where a call does not fit it (an exported
    graph takes exactly the arguments its example inputs gave); return where it fits."""
    signature = inspect.signature(lowered.forward)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{type(source).__name__} was captured with the arguments ({', '.join(signature.parameters)}) "
                        f"and this call does not fit them: {err}; give compile() example inputs with every argument "
                        f"the model is called with") from None


def _annotations(traced: torch.fx.GraphModule) -> Iterator[tuple[torch.fx.Node, MpcMeta]]:
    for node in traced.graph.nodes:
        meta = mpc_meta(node)
        if meta is not None and meta.classified:
            yield node, meta


_RECAPTURED = ("traced", "lowered", "example_inputs", "batches")


def _effects(state: PassState) -> dict[str, tuple]:
    """What each assigned node computes (``Assignment.effect``), by node name."""
    return {node.name: meta.assignment.effect for node, meta in _annotations(state.traced) if meta.assignment}


def _held(traced: torch.fx.GraphModule) -> dict[str, nn.Module]:
    """The modules lowering keeps on a traced graph (``_GRAPH_STATE``): state the modes share."""
    return {name: getattr(traced, name) for name in _GRAPH_STATE if hasattr(traced, name)}


def _hold(traced: torch.fx.GraphModule, held: dict[str, nn.Module]) -> None:
    """Put ``_held``'s modules on a newly captured graph, before lowering would make its own."""
    for name, module in held.items():
        setattr(traced, name, module)


def _capture_mode(first: PassState, state: PassState) -> PassState:
    """Run the compile passes for a newly captured mode. It shares the first mode's graph state
    (an op's amax history is one history, whichever mode fills it) and takes its kappa estimates
    node by node instead of estimating them again, so that the same rules select the same ops
    and both modes have the same assignments."""
    before, after = COMPILE[:COMPILE.index(CONDITION)], COMPILE[COMPILE.index(CONDITION) + 1:]
    run_passes(before, state)
    _hold(state.traced, _held(first.traced))
    kappas = {n.name: mpc_meta(n).kappa for n, _ in _annotations(first.traced)}
    for node, meta in _annotations(state.traced):
        meta.kappa = kappas.get(node.name)
    return run_passes(after, state)


def _is_fsdp(cls: type) -> bool:
    return any(c.__name__ == "FSDPModule" for c in cls.__mro__)


def _check_live_reads(state: PassState) -> None:
    """FSDP2 swaps each parameter between a sharded DTensor and the gathered tensor on its owning
    module; a graph that reads a parameter through a copy of that module would train on stale weights."""
    stale = stale_reads(state.lowered, state.model)
    if stale:
        raise CompileError(f"fully_shard: this CompiledModel ({state.capture} capture) reads {', '.join(stale[:3])}"
                           f"{' ...' if len(stale) > 3 else ''} through copies of the modules that own them, so it "
                           f"would not see the parameters FSDP2 gathers for each forward; train data-parallel with "
                           f"DDP (mpcompile train --nproc N)")


def _check_unsharded(source: nn.Module) -> None:
    """Every parameter is a plain tensor at the forward: a module sharded as its own FSDP2 unit
    (fully_shard of a layer) is gathered by hooks around its forward, which the lowered graph,
    reading its weights directly, never calls."""
    if all(type(p).__name__ != "DTensor" for p in source.parameters()):  # every forward: no names built
        return
    for name, p in source.named_parameters():
        if type(p).__name__ == "DTensor":
            owner = name.rpartition(".")[0] or "the model"
            raise CompileError(f"fully_shard: {owner} ({type(source.get_submodule(name.rpartition('.')[0])).__name__}) "
                               f"is sharded as its own FSDP2 unit, but the lowered graph reads its weights without "
                               f"calling its forward, so FSDP2 never gathers them ({name} is a sharded DTensor here); "
                               f"apply fully_shard to the CompiledModel alone, as one unit: fully_shard(cm, ...)")


def _warn_narrower_parameters(state: PassState, compiled: torch.dtype, dtype: torch.dtype) -> None:
    """Parameters narrower than the graph was compiled for (FSDP2's ``MixedPrecisionPolicy(
    param_dtype=...)``, ``.to(dtype)``) make every tensor the graph computes that dtype: the
    policy's formats then round its values, and a role the policy keeps wider holds its values."""
    if not (dtype.is_floating_point and torch.finfo(dtype).bits < torch.finfo(compiled).bits):
        return
    short = str(dtype).removeprefix("torch.")
    wider, fp32_ops = [], 0
    for node, meta in _annotations(state.traced):
        if meta.assignment is None or not meta.assignment.quantizes:
            fp32_ops += 1
            continue
        roles = [f"{r} {'fp32' if st.quant is None else st.quant.fmt}" for r, st in meta.assignment.roles
                 if r in meta.roles and (st.quant is None or not fits_dtype(st.quant.fmt, dtype))]
        if roles:
            wider.append(f"node {node.name} ({meta.op_type} '{meta.name}'): {', '.join(roles)}")
    held = "; ".join(wider[:5]) + (f"; and {len(wider) - 5} more ops" if len(wider) > 5 else "")
    warnings.warn(f"mpcompile: the parameters are {short} at this call and the graph was compiled for "
                  f"{str(compiled).removeprefix('torch.')} (FSDP2's MixedPrecisionPolicy(param_dtype=...) or "
                  f".to(dtype) casts them): every tensor it computes is {short}, the policy's formats round {short} "
                  f"values, and what the policy keeps wider holds {short} values instead"
                  + (f": {held}" if wider else "") + (f"; {fp32_ops} ops the policy leaves in fp32" if fp32_ops else ""),
                  stacklevel=5)


def _snapshot(state: PassState) -> dict[str, Any]:
    """A mode's state without its graphs: the options, every node's ``MpcMeta`` by name and the
    graph-held buffers (amax histories)."""
    kept = {f.name: getattr(state, f.name) for f in fields(state) if f.name not in _RECAPTURED}
    metas = {n.name: mpc_meta(n) for n in state.traced.graph.nodes if mpc_meta(n) is not None}
    return {"state": kept, "metas": metas, "held": _held(state.traced)}


def _restore(source: nn.Module, mode: bool, snapshot: dict[str, Any]) -> PassState:
    """The mode's state again: captured anew (capture is deterministic: the same node names),
    its analysis put back node by node, lowered; nothing is re-estimated or re-assigned."""
    state = PassState(**{**snapshot["state"], "model": source})
    training = source.training
    source.train(mode)
    try:
        run_passes((CAPTURE, SHAPE), state)
    finally:
        source.train(training)
    nodes = {n.name: n for n in state.traced.graph.nodes}
    if set(snapshot["metas"]) - set(nodes):
        raise CompileError(f"cannot restore the compiled {type(source).__name__}: capturing it again gives other nodes")
    for name, meta in snapshot["metas"].items():
        nodes[name].meta["mpc"] = meta
    _hold(state.traced, snapshot["held"])
    run_passes((LOWER,), state)
    return state


def compile(model: nn.Module, policy: "Policy | Mapping | str | Path", example_inputs: Iterable | None = None, *,
            example_kwargs: Mapping[str, Any] | None = None, capture: str = "auto", strict: bool | None = None,
            leaf_modules: Iterable[type] = (), calibration: Iterable | None = None,
            level: "int | str" = 0, backend: str = "auto") -> CompiledModel:
    """Capture ``model`` (torch.fx, or torch.export where fx cannot) and lower it under ``policy``.

    Args:
        model: any module (a ``CompiledModel``: its source is compiled anew; an
            ``fx.GraphModule``: used as it is).
        policy: a ``Policy``, a mapping, a path to a .yaml, .yml or .json file, a shipped
            policy's name (``"hfp8"``), or YAML text.
        example_inputs: positional inputs (a tensor: the one input); when given, shapes and
            dtypes are recorded per node and the coverage check runs. With fx, forward's
            parameters that default to None or a bool and that these do not give are fixed to
            their defaults in the trace.
        example_kwargs: keyword inputs (``input_ids=..., attention_mask=...``).
        capture: ``auto`` (a GraphModule as it is; else fx, then torch.export), ``fx``,
            ``export`` or ``graph`` (see ``mpcompile.capture.paths``); ``cm.capture`` says which.
        strict: GEMM work that runs in fp32 where the policy quantizes it is a CompileError
            (default: the policy's ``strict``, else a warning).
        leaf_modules: module types fx keeps as opaque calls (they run unchanged).
        calibration: batches (a tensor, a tuple of positional or a mapping of keyword arguments
            each) on which the condition and stats passes run; default: the example inputs.
        level: the policy level to start at (or a mapping from node names to levels).
        backend: ``auto`` (Triton kernels for CUDA tensors, the torch reference elsewhere),
            ``torch`` or ``triton`` (on the CPU only in Triton's interpreter); the numbers are
            the same. See ``mpcompile.backends``.

    The model is captured in its current mode (train or eval); the other mode is captured the
    first time the compiled model runs in it.
    """
    if isinstance(model, CompiledModel):
        model = model.source
    policy = load_policy(policy)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = None if example_inputs is None and example_kwargs is None else \
        Inputs(tuple(example_inputs or ()), dict(example_kwargs or {}))
    kappa_rules = [rule.label for rule in policy.rules if rule.match.needs_kappa]
    if kappa_rules and calibration is None and inputs is None:
        raise PolicyError(f"{kappa_rules[0]}: selects on kappa, which the condition pass estimates on data: "
                          f"give compile() calibration= batches or example_inputs")
    batches = (inputs,) if calibration is None and inputs is not None else tuple(map(as_inputs, calibration or ()))
    state = PassState(model, policy, level, tuple(leaf_modules), inputs, batches, capture, check_backend(backend))
    return CompiledModel(run_passes(COMPILE, state), bool(policy.strict if strict is None else strict))
