"""Precision policies: YAML schema v1, validated with file:line:column, resolved per op by cascade.

A policy says which format each tensor role of each op gets and with which arithmetic:
``default`` covers every GEMM-like op, ``rules`` override it role by role for the ops their
selectors match (top to bottom, the last match wins), and ``levels`` is a ladder of overrides
for dynamic precision. ``load_policy`` reads one; ``Policy.resolve`` answers for one op;
``lock_policy`` writes resolved answers back as a policy. The schema is written down in
docs/policy.md.

- ``schema``: the dataclasses a policy is made of (selectors matching ops among them), their
  defaults and the schema's constants;
- ``parse``: reading YAML or a mapping, with every error located;
- ``cascade``: the ``Policy``, and default, rules and levels combined per op;
- ``lock``: the lock file.
"""
from __future__ import annotations

from .cascade import Policy, resolve
from .lock import lock_policy, spec_mapping
from .parse import SHIPPED_POLICIES, load_policy, shipped_policies
from .schema import (COMM_ROUNDINGS, EPSILON_MODES, GROUPS, NATIVE, OPTIMIZER_KINDS, SCHEMA_VERSION,
                     TRUST_REGION_METHODS, Assignment, CommunicationSettings, Level, MonitorSettings, NodeFacts, OptimizerSettings, Period, RoleSetting, Rule, Selector,
                     Settings, TrustRegionSettings, MONITOR_ROLES)

__all__ = ["SCHEMA_VERSION", "GROUPS", "TRUST_REGION_METHODS", "EPSILON_MODES", "NATIVE", "SHIPPED_POLICIES",
           "RoleSetting", "Settings", "Selector", "Rule", "Level", "Policy", "NodeFacts", "Assignment",
           "OPTIMIZER_KINDS", "Period", "OptimizerSettings", "TrustRegionSettings", "MONITOR_ROLES", "MonitorSettings",
           "COMM_ROUNDINGS", "CommunicationSettings", "load_policy", "shipped_policies", "resolve",
           "lock_policy", "spec_mapping"]
