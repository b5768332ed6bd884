"""``MpcMeta``: everything mpcompile knows about one fx node, kept in ``node.meta["mpc"]``.

One field per fact, written by the pass named beside it and read through attributes (assign
also clears the statistics, which belong to the assignment they measured).
A lowered graph's nodes carry a copy of the traced node's meta with ``source`` set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..policy import Assignment, NodeFacts

__all__ = ["MpcMeta", "KappaSummary", "RoleStats", "mpc_meta", "meta_of"]

_KEY = "mpc"


@dataclass(frozen=True)
class KappaSummary:
    """Nearest-rank quantiles of an op's condition numbers over the calibration batches."""

    median: float
    p99: float  # what ``kappa_above`` / ``kappa_below`` select on
    max: float


@dataclass(frozen=True)
class RoleStats:
    """Shares of one role's values under its format: above max, flushed to zero, subnormal."""

    overflow: float
    flush_to_zero: float
    subnormal: float


@dataclass
class MpcMeta:
    """mpcompile's facts about one node.

    Attributes:
        shape, dtype: the node's tensor output (shape pass; None without example inputs).
        op_type: module class name (``Conv2d``) or function / method name (``relu``) (classify).
        name: qualified module name, or ``<owner>.<node>`` for a function (classify).
        group: ``gemm``, ``norm``, ``activation``, ``pool``, ``elementwise`` or None (classify).
        kind: the op registry's kind (``linear``, ``conv2d``, ``addmm``...) or None (classify).
        gemm_index, gemm_count: position among the model's GEMM-like ops, and their number (classify).
        roles: the tensor roles lowering can round for this node (classify).
        unemulated: why GEMM work at this node runs in fp32 whatever the policy says (classify).
        kappa: condition-number summary on calibration data (condition).
        assignment: the policy's resolution, where it sets anything (assign).
        stats: per role with a format and no scaling, the shares of its values under it (stats).
        sqnr_db: the output's SQNR against the fp32 model, errors of earlier ops included (stats).
        source: in a lowered graph, the name of the traced node this node stands for (lower).
    """

    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    op_type: str | None = None
    name: str | None = None
    group: str | None = None
    kind: str | None = None
    gemm_index: int | None = None
    gemm_count: int = 0
    roles: tuple[str, ...] = ()
    unemulated: str | None = None
    kappa: KappaSummary | None = None
    assignment: Assignment | None = None
    stats: dict[str, RoleStats] | None = None
    sqnr_db: float | None = None
    source: str | None = None

    @property
    def classified(self) -> bool:
        """Whether classify recorded this node (every call node)."""
        return self.op_type is not None

    @property
    def facts(self) -> NodeFacts:
        """What policy selectors look at: the classify facts and the kappa p99."""
        return NodeFacts(self.op_type, self.name, self.group, self.gemm_index, self.gemm_count,
                         None if self.kappa is None else self.kappa.p99)


def mpc_meta(node: torch.fx.Node) -> MpcMeta | None:
    """The node's ``MpcMeta``, or None where no pass wrote one."""
    return node.meta.get(_KEY)


def meta_of(node: torch.fx.Node) -> MpcMeta:
    """The node's ``MpcMeta``, created empty where none exists (for the passes that write it)."""
    meta = node.meta.get(_KEY)
    if meta is None:
        meta = node.meta[_KEY] = MpcMeta()
    return meta
