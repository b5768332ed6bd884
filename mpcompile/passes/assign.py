"""assign: resolve the policy for every node.

Reads: ``meta["mpc"]["facts"]`` (classify). Writes: ``meta["mpc"]["assignment"]`` (an
``Assignment``) where the policy sets anything (an fp32 ``keep`` included), and clears it elsewhere.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..policy import Policy

__all__ = ["assign_formats", "unmatched_rules"]


def assign_formats(gm: torch.fx.GraphModule, policy: Policy,
                   level: "int | str | Mapping[str, int | str]" = 0) -> None:
    """Record ``policy.resolve`` of each classified node at ``level``: one level for every node,
    or a mapping from node names to levels (a node it does not name is at level 0)."""
    for node in gm.graph.nodes:
        meta = node.meta.get("mpc", {})
        meta.pop("assignment", None)
        if "facts" in meta:
            at = level.get(node.name, 0) if isinstance(level, Mapping) else level
            assignment = policy.resolve(meta["facts"], at)
            if assignment.roles or assignment.quantizes:
                meta["assignment"] = assignment


def unmatched_rules(gm: torch.fx.GraphModule, policy: Policy) -> list[str]:
    """Labels of the policy's rules that matched no node (a warning, not an error)."""
    matched = {label for node in gm.graph.nodes
               for label in getattr(node.meta.get("mpc", {}).get("assignment"), "matched", ())}
    return [rule.label for rule in policy.rules if rule.label not in matched]
