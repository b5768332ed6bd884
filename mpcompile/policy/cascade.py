"""The cascade: a ``Policy`` and how its default, rules and levels combine into an op's
``Assignment``, role by role, with the deciding section of each recorded.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import PolicyError
from ..ops.spec import ROLES, Recompute
from .schema import (NATIVE, Assignment, CommunicationSettings, Level, MonitorSettings, NodeFacts, OptimizerSettings,
                     RoleSetting, Rule, Settings, TrustRegionSettings)

__all__ = ["Policy", "resolve"]


def resolve(policy: "Policy", op: NodeFacts, level: "int | str" = 0) -> Assignment:
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
        if rule.match.matches(op):
            apply(rule.settings, rule.label, False)
            matched.append(rule.label)
    for lv in policy.levels[1:policy.level_index(level) + 1]:
        apply(lv.settings, lv.label, True)
    return Assignment(tuple((r, roles[r]) for r in ROLES if r in roles), specs["forward"], specs["backward"],
                      tuple(decided.items()), tuple(matched), recompute["value"])


@dataclass(frozen=True)
class Policy:
    """A validated policy (schema v1). ``levels[0]`` is the policy itself."""

    name: str
    description: str
    default: Settings
    rules: tuple[Rule, ...]
    levels: tuple[Level, ...]
    source: str  # the file (or "<string>", "<dict>") it was read from
    trust_region: TrustRegionSettings | None = None  # read by the runtime
    optimizer: OptimizerSettings = OptimizerSettings()
    strict: bool = False  # GEMM work the compiled model runs in fp32 against the policy is an error, not a warning
    monitor: MonitorSettings | None = None  # read by the runtime: what training records of its numbers
    communication: CommunicationSettings | None = None  # read by the runtime: how data-parallel gradients travel

    @property
    def wants_calibration(self) -> bool:
        """Whether a model under this policy needs the condition pass: a rule or the monitor
        selects on kappa, or a section recomputes output components by their condition number
        (whose thresholds are set against the kappa the pass measures)."""
        sections = [self.default] + [r.settings for r in self.rules] + [lv.settings for lv in self.levels]
        selectors = [r.match for r in self.rules] + list(self.monitor.ops if self.monitor is not None else ())
        return (any(s.needs_kappa for s in selectors)
                or any(isinstance(s.recompute, Recompute) for s in sections))

    def level_index(self, level: "int | str") -> int:
        """The position of ``level`` (a name or a number) in the ladder.

        Raises:
            PolicyError: no level has that name, or the number is out of range.
        """
        names = [lv.name for lv in self.levels]
        if isinstance(level, str):
            if level not in names:
                raise PolicyError(f"{self.source}: no level named '{level}'; levels are {', '.join(names) or 'none'}")
            return names.index(level)
        if not 0 <= level < max(1, len(self.levels)):
            raise PolicyError(f"{self.source}: level {level} is out of range: the ladder has {max(1, len(names))} levels")
        return level

    def resolve(self, op: NodeFacts, level: "int | str" = 0) -> Assignment:
        """The cascade for one op at ``level`` (``resolve``: default, rules, levels)."""
        return resolve(self, op, level)
