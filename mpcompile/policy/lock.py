"""The lock file: resolved assignments written back as a policy (a plain dict, ready for JSON or
YAML) with one rule per op, an exact ``name_regex``, that sets every role and both arithmetic
specs as resolved, so loading it reproduces the assignments whatever rules, levels and defaults
produced them; and the sections the runtime reads (``optimizer``, ``trust_region``, ``monitor``, ``strict``)
as the policy gave them, so that training under the lock trains as under the policy.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Mapping

from ..ops.spec import ArithSpec
from .schema import SCHEMA_VERSION, Assignment, CommunicationSettings, MonitorSettings, OptimizerSettings, Selector, TrustRegionSettings

__all__ = ["spec_mapping", "selector_mapping", "lock_policy", "runtime_sections"]


def spec_mapping(spec: ArithSpec) -> dict[str, Any]:
    """An arithmetic spec as the policy's ``forward:`` / ``backward:`` mapping, every field spelled out."""
    fields = {"mul": None if spec.mul is None else str(spec.mul), "acc": str(spec.acc), "order": spec.order,
              "rounding": spec.rounding, "mul_rounding": spec.mul_rounding, "fma": spec.fma, "kahan": spec.kahan}
    return fields | ({"sr_bits": spec.sr_bits} if spec.sr_bits is not None else {})


def runtime_sections(optimizer: OptimizerSettings, trust_region: TrustRegionSettings | None,
                     strict: bool, monitor: MonitorSettings | None = None,
                     communication: CommunicationSettings | None = None) -> dict[str, Any]:
    """The policy sections the runtime reads, as a policy spells them; those at their defaults
    left out."""
    sections: dict[str, Any] = {}
    stored = {f.name: getattr(optimizer, f.name) for f in dataclasses.fields(optimizer)
              if getattr(optimizer, f.name) != f.default}
    if stored:
        sections["optimizer"] = {k: v if isinstance(v, (str, float, int)) else str(v) for k, v in stored.items()}
    if trust_region is not None:
        sections["trust_region"] = dataclasses.asdict(trust_region)
    if monitor is not None:
        sections["monitor"] = {"every": monitor.every, "roles": list(monitor.roles), "histograms": monitor.histograms}
        if monitor.ops:
            sections["monitor"]["ops"] = [selector_mapping(s) for s in monitor.ops]
    if communication is not None:
        c = communication
        scaling = f"block({c.block_size})" if c.scaling == "block" else c.scaling
        sections["communication"] = {"format": str(c.format), "scaling": scaling, "rounding": c.rounding,
                                     "error_feedback": c.error_feedback, "shared_scale": c.shared_scale}
    return sections | ({"strict": True} if strict else {})


def selector_mapping(selector: Selector) -> dict[str, Any]:
    """A selector as a ``match:`` mapping, the conditions it gives only."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(selector):
        value = getattr(selector, f.name)
        if value in (None, ()):
            continue
        out[f.name] = value.pattern if isinstance(value, re.Pattern) else list(value) if isinstance(value, tuple) else value
    return out


def lock_policy(entries: Iterable[tuple[str, Assignment]], name: str, description: str,
                sections: Mapping[str, Any] = {}) -> dict[str, Any]:
    """The policy (schema v1, as a dict) that gives each named op exactly its assignment.

    Args:
        entries: (qualified op name, its assignment) in the order the rules should appear.
        name: the lock's ``name``.
        description: the lock's ``description`` (where the assignments were resolved from).
        sections: top-level sections written as they are (``runtime_sections``).
    """
    rules = []
    for op_name, assignment in entries:
        rule: dict[str, Any] = {"match": {"name_regex": re.escape(op_name)}}
        for role, setting in assignment.roles:
            rule[role] = None if setting.quant is None else str(setting.quant)  # the role's string form, whole
        rule["forward"], rule["backward"] = spec_mapping(assignment.forward), spec_mapping(assignment.backward)
        if assignment.recompute is not None:
            tau = assignment.recompute.tau
            rule["recompute"] = {"tau": "inf" if tau == math.inf else tau,  # JSON has no inf that YAML reads
                                 "forward": spec_mapping(assignment.recompute.forward)}
        rules.append(rule)
    return {"version": SCHEMA_VERSION, "name": name, "description": description, **sections, "rules": rules}
