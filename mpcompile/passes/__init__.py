"""Graph passes over a traced model, run in a fixed order by ``mpcompile.compiler``.

Each pass states what it reads and writes; everything it writes is under ``node.meta["mpc"]``.
"""
from .assign import assign_formats
from .classify import GEMM_KINDS, classify
from .lower import lower
from .shape import propagate_shapes

__all__ = ["propagate_shapes", "classify", "assign_formats", "lower", "GEMM_KINDS", "mpc_meta"]


def mpc_meta(node) -> dict:
    """The pass metadata of an fx node (created on first use)."""
    return node.meta.setdefault("mpc", {})
