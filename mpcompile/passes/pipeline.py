"""The pass lists: what ``compile`` runs, and what a recompile runs again.

capture -> shape -> classify -> coverage -> condition -> assign -> lower -> stats. coverage
completes classify (what runs where no policy reaches); condition comes before assign because
rules may select on kappa; stats after lower, because it measures the lowered model against the
fp32 one. A recompile (another policy or level) runs assign and lower: the parameters are the
same objects; where it changes formats of a model calibrated at compile, it measures again
(RECALIBRATE: kappa with the parameters of now, then the new formats' statistics).
"""
from __future__ import annotations

from ..capture import capture, flat_inputs
from .assign import assign_formats
from .classify import classify
from .condition import estimate_condition
from .coverage import check_coverage
from .lower import lower
from .manager import Pass, PassState, check_order
from .shape import propagate_shapes
from .source_modules import bind_source_modules
from .stats import collect_stats

__all__ = ["COMPILE", "RECOMPILE", "RECALIBRATE", "STATS", "CAPTURE", "SHAPE", "CLASSIFY", "COVERAGE", "CONDITION", "ASSIGN", "LOWER"]


def _capture(state: PassState) -> None:
    first = state.inputs if state.inputs is not None else state.calibration[0] if state.calibration else None
    state.traced, state.capture = capture(state.model, state.capture, first, state.leaf_modules)
    state.example_inputs = None if state.inputs is None else flat_inputs(state.traced, state.inputs)
    state.batches = [flat_inputs(state.traced, batch) for batch in state.calibration]


def _lower(state: PassState) -> None:
    state.lowered = lower(state.traced, state.backend)
    bind_source_modules(state.lowered, state.model)


CAPTURE = Pass("capture", _capture)
SHAPE = Pass("shape", lambda s: propagate_shapes(s.traced, s.example_inputs), writes=("shape", "dtype"),
             applies=lambda s: s.example_inputs is not None)
CLASSIFY = Pass("classify", lambda s: classify(s.traced),
                writes=("op_type", "name", "group", "kind", "gemm_index", "gemm_count", "roles", "unemulated"))
CONDITION = Pass("condition", lambda s: estimate_condition(s.traced, s.batches), reads=("kind", "group"),
                 writes=("kappa",), applies=lambda s: bool(s.batches))
ASSIGN = Pass("assign", lambda s: assign_formats(s.traced, s.policy, s.level),
              reads=("op_type", "name", "group", "gemm_index", "gemm_count", "kappa"),
              writes=("assignment", "stats", "sqnr_db"))
LOWER = Pass("lower", _lower, reads=("kind", "group", "roles", "assignment", "dtype"), writes=("source",))
COVERAGE = Pass("coverage", lambda s: check_coverage(s.traced, s.example_inputs), reads=("kind", "unemulated"),
                 writes=("unemulated",), applies=lambda s: s.example_inputs is not None)
STATS_PASS = Pass("stats", lambda s: collect_stats(s.traced, s.lowered, s.batches),
                  reads=("assignment", "kind", "roles", "source"), writes=("stats", "sqnr_db"),
                  applies=lambda s: bool(s.batches))

COMPILE = (CAPTURE, SHAPE, CLASSIFY, COVERAGE, CONDITION, ASSIGN, LOWER, STATS_PASS)
RECOMPILE = (ASSIGN, LOWER)
RECALIBRATE = (CONDITION, ASSIGN, LOWER, STATS_PASS)
STATS = (STATS_PASS,)
check_order(COMPILE, written_before=("kappa",))  # kappa is optional: without calibration data it stays None
check_order(RECOMPILE, written_before=[f for p in (SHAPE, CLASSIFY, CONDITION, COVERAGE) for f in p.writes])
check_order(RECALIBRATE, written_before=[f for p in (SHAPE, CLASSIFY, COVERAGE) for f in p.writes])
