"""assign: resolve the policy for every classified node.

Reads: ``MpcMeta.facts`` (classify, and the kappa of condition). Writes ``MpcMeta.assignment``
(an ``Assignment``) where the policy sets anything (an fp32 ``keep`` included), and clears it
elsewhere; clears ``stats`` and ``sqnr_db``, which measured the previous assignment.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..policy import Policy
from .meta import mpc_meta

__all__ = ["assign_formats", "level_of"]


def level_of(level: "int | str | Mapping[str, int | str]", node: torch.fx.Node) -> "int | str":
    """A node's level: one level for every node, or a mapping from node names to levels (a node
    it does not name is at level 0)."""
    return level.get(node.name, 0) if isinstance(level, Mapping) else level


def assign_formats(gm: torch.fx.GraphModule, policy: Policy,
                   level: "int | str | Mapping[str, int | str]" = 0) -> None:
    """Record ``policy.resolve`` of each classified node at its ``level_of``.

    Args:
        gm: the classified model.
        policy: the policy in force.
        level: one level for every node, or node name -> level.
    """
    for node in gm.graph.nodes:
        meta = mpc_meta(node)
        if meta is None:
            continue
        meta.assignment, meta.stats, meta.sqnr_db = None, None, None
        if meta.classified:
            assignment = policy.resolve(meta.facts, level_of(level, node))
            if assignment.roles or assignment.quantizes:
                meta.assignment = assignment

