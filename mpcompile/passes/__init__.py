"""Graph passes over a traced model, run in a fixed order by ``mpcompile.compiler``.

Each pass states what it reads and writes; everything it writes is under ``node.meta["mpc"]``.
"""
from .assign import assign_formats
from .classify import GEMM_KINDS, classify
from .condition import estimate_condition
from .lower import lower
from .shape import propagate_shapes
from .stats import collect_stats

__all__ = ["propagate_shapes", "classify", "estimate_condition", "assign_formats", "lower", "collect_stats",
           "GEMM_KINDS"]
