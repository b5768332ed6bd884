"""audit: what a policy's settings change for one model, and where they change nothing.

Reads ``MpcMeta.facts`` of the classified nodes (classify, condition). Writes nothing: it
returns the warnings a compiled model issues about its policy (``CompiledModel.warnings``):

- a rule that matches no op (one that selects on kappa says calibration was missing), or that
  changes nothing for the ops it matches (``keep: fp32`` on ops that are fp32 anyway, or
  settings every later rule overrides); a rule that matches GEMM work lowering does not emulate
  is never idle (``keep: fp32`` there silences the warning that it runs in fp32);
- a level that changes nothing against the level below it;
- a ``default`` that changes nothing (``keep: fp32`` there, or roles every rule overrides);
- a key that has no effect where it is written: ``sr_bits`` without stochastic rounding,
  ``axis`` on a role that neither blocks nor scales per channel, ``fma`` (products without a
  ``mul`` format are exact already), ``mul_rounding`` without ``mul``.

Per-op checks (roles an op lacks, GEMM work that stays fp32) belong to the compiled model.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch

from ..formats import BlockFormat
from ..policy import NodeFacts, Policy, Settings
from .meta import mpc_meta

__all__ = ["setting_warnings"]


def setting_warnings(gm: torch.fx.GraphModule, policy: Policy, calibrated: bool) -> list[str]:
    """The warnings on ``policy``'s settings for the classified model ``gm``.

    Args:
        gm: the classified (and, where ``calibrated``, conditioned) traced model.
        policy: the policy in force.
        calibrated: whether the condition pass ran, so that kappa selectors could match.
    """
    metas = [meta for meta in map(mpc_meta, gm.graph.nodes) if meta is not None and meta.classified]
    ops, unemulated = [m.facts for m in metas], {m.name for m in metas if m.unemulated}
    return list(_rules(policy, ops, unemulated, calibrated)) + list(_levels(policy, ops)) + list(_keys(policy))


def _names(ops: list[NodeFacts]) -> str:
    return ", ".join(op.name for op in ops[:4]) + (f" and {len(ops) - 4} more" if len(ops) > 4 else "")


def _rules(policy: Policy, ops: list[NodeFacts], unemulated: set[str], calibrated: bool) -> Iterator[str]:
    gemms = [op for op in ops if op.group == "gemm" and op.name not in unemulated]
    if policy.default != Settings() and gemms:
        bare = replace(policy, default=Settings())
        if all(policy.resolve(op).effect == bare.resolve(op).effect for op in gemms):
            yield ("default: changes nothing for this model" + (": keep: fp32 is what an op gets where nothing is set"
                                                                if policy.default.keeps_fp32 else ": rules set all it sets"))
    for i, rule in enumerate(policy.rules):
        matched = [op for op in ops if rule.match.matches(op)]
        if not matched:
            why = "" if calibrated or not rule.match.needs_kappa else \
                ("; it selects on kappa, which needs calibration batches: compile(..., calibration=[...]) "
                 "or mpcompile train --calibration-batches")
            yield f"{rule.label}: matches no op of this model{why}"
            continue
        if any(op.name in unemulated for op in matched):  # keep: fp32 there says its fp32 is intended
            continue
        without = replace(policy, rules=policy.rules[:i] + policy.rules[i + 1:])
        if all(policy.resolve(op).effect == without.resolve(op).effect for op in matched):
            fp32 = rule.settings.keeps_fp32 and not any(without.resolve(op).quantizes for op in matched)
            yield (f"{rule.label}: changes nothing for the ops it matches ({_names(matched)}): "
                   + ("keep: fp32 on ops that are fp32 anyway" if fp32 else "later rules set all it sets"))


def _levels(policy: Policy, ops: list[NodeFacts]) -> Iterator[str]:
    for i in range(1, len(policy.levels)):
        if all(policy.resolve(op, i).effect == policy.resolve(op, i - 1).effect for op in ops):
            yield (f"{policy.levels[i].label}: changes nothing for this model against level "
                   f"'{policy.levels[i - 1].name}' (a level only changes what is quantized at the level below)")


def _sections(policy: Policy) -> Iterator[tuple[str, Settings]]:
    yield "default", policy.default
    for rule in policy.rules:
        yield rule.label, rule.settings
    for level in policy.levels[1:]:
        yield level.label, level.settings


def _keys(policy: Policy) -> Iterator[str]:
    for where, settings in _sections(policy):
        for role, setting in settings.roles:
            q = setting.quant
            if q is None:
                continue
            if q.sr_bits is not None and q.rounding != "stochastic":
                yield f"{where}: {role}.sr_bits has no effect: its rounding is {q.rounding}, not stochastic"
            if q.axis is not None and not isinstance(q.fmt, BlockFormat) and not q.scaling.startswith("channel"):
                yield (f"{where}: {role}.axis has no effect: {q.fmt} is not a block format and the scaling is "
                       f"{q.scaling}, not channel")
        for key in ("forward", "backward"):
            spec = getattr(settings, key)
            if spec is None:
                continue
            if spec.sr_bits is not None and not spec.stochastic:
                yield f"{where}: {key}.sr_bits has no effect: no rounding of this arithmetic is stochastic"
            if spec.fma:
                yield (f"{where}: {key}.fma has no effect: with mul null every product is exact and each add "
                       f"rounded once, which is a fused multiply-add already")
            if spec.mul is None and spec.mul_rounding != spec.rounding:
                yield f"{where}: {key}.mul_rounding has no effect: mul is null, so products are exact"
