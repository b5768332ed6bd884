"""The cascade: which rules match an op, and how default, rules and levels combine into its
``Assignment``, role by role, with the deciding section of each recorded.
"""
from __future__ import annotations

from ..ops.spec import ROLES, Recompute
from .schema import NATIVE, Assignment, NodeFacts, Policy, RoleSetting, Selector, Settings

__all__ = ["selector_matches", "resolve"]


def selector_matches(selector: Selector, op: NodeFacts) -> bool:
    """Whether every condition ``selector`` gives holds for ``op``.

    ``type`` matches the op's class or function name or its group, ``name`` the qualified name or
    a module above it, ``name_regex`` the whole name; ``first``, ``last`` and ``index`` look at the
    op's position among the GEMM-like ops; an op without a kappa estimate never matches a kappa bound.
    """
    pos = op.index
    return ((not selector.type or op.op_type in selector.type or op.group in selector.type)
            and (selector.name is None or op.name == selector.name or op.name.startswith(selector.name + "."))
            and (selector.name_regex is None or selector.name_regex.fullmatch(op.name) is not None)
            and (selector.first is None or (pos == 0) == selector.first)
            and (selector.last is None or (pos is not None and pos == op.gemm_count - 1) == selector.last)
            and (not selector.index or (pos is not None and any(pos == (i if i >= 0 else op.gemm_count + i)
                                                                 for i in selector.index)))
            and (selector.kappa_above is None or (op.kappa is not None and op.kappa > selector.kappa_above))
            and (selector.kappa_below is None or (op.kappa is not None and op.kappa < selector.kappa_below)))


def resolve(policy: Policy, op: NodeFacts, level: "int | str" = 0) -> Assignment:
    """The cascade for one op: ``default`` (GEMM-like ops only), then every matching rule
    top to bottom, role by role, then levels 1..``level``, which override only what is
    quantized: a role left untouched (null) stays untouched, so a ladder never lowers the
    precision of what a rule kept in fp32. A level's ``recompute`` likewise reaches only ops
    whose forward arithmetic is emulated, or that recompute already.

    Args:
        policy: the validated policy.
        op: what the selectors look at for the op.
        level: a level's name or number in ``policy.levels`` (0: the policy itself).

    Raises:
        PolicyError: ``level`` names no level of the policy.
    """
    roles: dict[str, RoleSetting] = {}
    specs = {"forward": NATIVE, "backward": NATIVE}
    recompute: dict[str, Recompute | None] = {"value": None}
    decided: dict[str, str] = {}
    matched = []

    def apply(settings: Settings, label: str, only_quantized: bool) -> None:
        emulated = not specs["forward"].is_native or recompute["value"] is not None
        for role, setting in settings.roles:
            if not only_quantized or (role in roles and roles[role].quant is not None):
                roles[role], decided[role] = setting, label
        for key in ("forward", "backward"):
            spec = getattr(settings, key)
            if spec is not None and (not only_quantized or not specs[key].is_native):
                specs[key], decided[key] = spec, label
        if settings.recompute is not None and (not only_quantized or emulated):
            recompute["value"] = None if settings.recompute == "off" else settings.recompute
            decided["recompute"] = label

    if op.group == "gemm":
        apply(policy.default, "default", False)
    for rule in policy.rules:
        if selector_matches(rule.match, op):
            apply(rule.settings, rule.label, False)
            matched.append(rule.label)
    for lv in policy.levels[1:policy.level_index(level) + 1]:
        apply(lv.settings, lv.label, True)
    return Assignment(tuple((r, roles[r]) for r in ROLES if r in roles), specs["forward"], specs["backward"],
                      tuple(decided.items()), tuple(matched), recompute["value"])
