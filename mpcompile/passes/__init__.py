"""Graph passes over a captured model, run in a fixed order by the pass manager (``pipeline``).

Each pass states which ``MpcMeta`` fields (``node.meta["mpc"]``) it reads and writes.
"""
from .assign import assign_formats
from .classify import classify
from .condition import estimate_condition
from .lower import lower
from .manager import Pass, PassState, run_passes
from .meta import MpcMeta, mpc_meta
from .shape import propagate_shapes
from .stats import collect_stats

__all__ = ["propagate_shapes", "classify", "estimate_condition", "assign_formats", "lower", "collect_stats",
           "Pass", "PassState", "run_passes", "MpcMeta", "mpc_meta"]
