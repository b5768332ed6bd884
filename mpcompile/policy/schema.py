"""The policy schema (v1) as values: the frozen dataclasses a validated policy is made of, their
defaults, and the schema's constants.

A policy holds a ``default`` (``Settings`` for every GEMM-like op), ``Rule``s (a ``Selector``
and the ``Settings`` it applies) and ``Level``s (the ladder for dynamic precision); asked about
one op (its ``NodeFacts``) it answers with an ``Assignment``. The ``Policy`` itself and how the
answer is computed live in ``cascade``; how a policy is read from YAML lives in ``parse``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..ops.spec import ROLES, ArithSpec, QuantSpec, Recompute

__all__ = ["SCHEMA_VERSION", "GROUPS", "TRUST_REGION_METHODS", "EPSILON_MODES", "NATIVE", "RoleSetting", "Settings",
           "Selector", "Rule", "Level", "NodeFacts", "Assignment", "OPTIMIZER_KINDS", "OPTIMIZER_KEY_KINDS", "PERIOD_UNITS", "STORAGES", "Period",
           "OptimizerSettings", "TrustRegionSettings", "MONITOR_ROLES", "MonitorSettings", "COMM_ROUNDINGS",
           "CommunicationSettings"]

SCHEMA_VERSION = 1
GROUPS = ("gemm", "elementwise", "norm", "activation", "pool")
TRUST_REGION_METHODS = ("trust_region", "mp_sgd")
EPSILON_MODES = ("measured", "bound")
NATIVE = ArithSpec()  # torch's own arithmetic: what an op gets where nothing names its specs


@dataclass(frozen=True)
class RoleSetting:
    """A role's quantization; ``quant`` None leaves the tensor as it is."""

    quant: QuantSpec | None


@dataclass(frozen=True)
class Settings:
    """What one section (default, a rule, a level) sets: only the roles and specs it names."""

    roles: tuple[tuple[str, RoleSetting], ...] = ()
    forward: ArithSpec | None = None
    backward: ArithSpec | None = None
    recompute: "Recompute | str | None" = None  # None: not named; "off": recompute: null, or keep: fp32

    @property
    def keeps_fp32(self) -> bool:
        """Whether this is ``keep: fp32``: every role untouched and torch's arithmetic."""
        return (len(self.roles) == len(ROLES) and all(s.quant is None for _, s in self.roles)
                and all(spec is not None and spec.is_native for spec in (self.forward, self.backward)))


@dataclass(frozen=True)
class Selector:
    """Which ops a rule matches: every given condition must hold."""

    type: tuple[str, ...] = ()  # module class, function or method name, or one of GROUPS
    name: str | None = None  # qualified module name; covers its submodules
    name_regex: re.Pattern | None = None  # full match on the qualified name
    first: bool | None = None  # position among GEMM-like ops in execution order
    last: bool | None = None
    index: tuple[int, ...] = ()  # negative counts from the end
    kappa_above: float | None = None  # the condition pass's estimate; ops without one never match
    kappa_below: float | None = None

    @property
    def needs_kappa(self) -> bool:
        """Whether this selector looks at the condition pass's estimate."""
        return self.kappa_above is not None or self.kappa_below is not None

    def matches(self, op: "NodeFacts") -> bool:
        """Whether every condition this selector gives holds for ``op``.

        ``type`` matches the op's class or function name or its group, ``name`` the qualified name or
        a module above it, ``name_regex`` the whole name; ``first``, ``last`` and ``index`` look at the
        op's position among the GEMM-like ops; an op without a kappa estimate never matches a kappa bound.
        """
        pos = op.index
        return ((not self.type or op.op_type in self.type or op.group in self.type)
                and (self.name is None or op.name == self.name or op.name.startswith(self.name + "."))
                and (self.name_regex is None or self.name_regex.fullmatch(op.name) is not None)
                and (self.first is None or (pos == 0) == self.first)
                and (self.last is None or (pos is not None and pos == op.gemm_count - 1) == self.last)
                and (not self.index or (pos is not None and any(pos == (i if i >= 0 else op.gemm_count + i)
                                                                     for i in self.index)))
                and (self.kappa_above is None or (op.kappa is not None and op.kappa > self.kappa_above))
                and (self.kappa_below is None or (op.kappa is not None and op.kappa < self.kappa_below)))


@dataclass(frozen=True)
class Rule:
    """One entry of ``rules:``: the settings applied to the ops its selector matches."""

    match: Selector
    settings: Settings
    label: str  # "rules[2] (file:line:col)"


@dataclass(frozen=True)
class Level:
    """One rung of ``levels:``: settings that override what is quantized."""

    name: str
    settings: Settings
    label: str


@dataclass(frozen=True)
class NodeFacts:
    """What selectors look at, for one op of a traced model (filled by the classify and condition passes)."""

    op_type: str  # module class name (Conv2d), or function / method name (relu, add)
    name: str  # qualified module name, or the fx node's name for a function
    group: str | None = None  # one of GROUPS
    index: int | None = None  # position among the model's GEMM-like ops, in execution order
    gemm_count: int = 0
    kappa: float | None = None  # the op's condition number summary (condition pass)


@dataclass(frozen=True)
class Assignment:
    """A policy's answer for one op: the roles set, the arithmetic, and who decided each."""

    roles: tuple[tuple[str, RoleSetting], ...]
    forward: ArithSpec
    backward: ArithSpec
    decided_by: tuple[tuple[str, str], ...]  # role / "forward" / "backward" / "recompute" -> section label
    matched: tuple[str, ...]  # labels of every rule that matched, in order
    recompute: Recompute | None = None  # per-component recomputation (GEMM-like ops)

    @property
    def quantizes(self) -> bool:
        """Whether anything is rounded: a role with a format, emulated arithmetic, or recomputation."""
        return (any(s.quant is not None for _, s in self.roles) or not (self.forward.is_native and self.backward.is_native)
                or self.recompute is not None)

    @property
    def effect(self) -> tuple:
        """What the op computes under this assignment, not who decided it: equal effects, equal numbers."""
        return (tuple((r, s.quant) for r, s in self.roles if s.quant is not None), self.forward, self.backward,
                self.recompute)

    @property
    def unit_roundoff(self) -> float:
        """The largest unit roundoff among what the forward pass rounds (operand and output roles,
        the forward products and sum); 0 when it rounds nothing. One rounding's relative error."""
        formats = [s.quant.fmt for r, s in self.roles if s.quant is not None and not r.startswith("grad")]
        if not self.forward.is_native:
            formats += [f for f in (self.forward.acc, self.forward.mul) if f is not None]
        return max((f.unit_roundoff for f in formats), default=0.0)


OPTIMIZER_KINDS = ("sgd", "adam", "adamw", "svrg", "lpsvrg", "halp", "swalp")
PERIOD_UNITS = ("steps", "epochs")
STORAGES = ("emulated", "packed")
# the optimizer kinds that read each key of the optimizer section; a key a kind does not read is refused
OPTIMIZER_KEY_KINDS = {
    "master": ("sgd", "adam", "adamw", "lpsvrg", "swalp"), "gradient": ("sgd", "adam", "adamw", "swalp"),
    "momentum": ("sgd", "adam", "adamw", "swalp"), "second_moment": ("adam", "adamw"),
    "T": ("svrg", "lpsvrg", "halp"), "mu": ("halp",), "bits": ("halp",),
    "swa_start": ("swalp",), "swa_every": ("swalp",),
    "update_rounding": ("sgd", "adam", "adamw", "lpsvrg", "halp", "swalp"),  # svrg stores nothing rounded
    "storage": ("sgd", "adam", "adamw", "swalp"),
}


@dataclass(frozen=True)
class Period:
    """A length of training: ``count`` optimizer steps or epochs (``"2 epochs"``, ``"500 steps"``)."""

    count: int
    unit: str = "steps"

    def steps(self, steps_per_epoch: int | None) -> int:
        """The period in steps; an epoch count needs ``steps_per_epoch``."""
        if self.unit == "steps":
            return self.count
        if steps_per_epoch is None:
            raise ValueError(f"a period of {self} needs the number of steps per epoch")
        return self.count * steps_per_epoch

    def __str__(self) -> str:
        return f"{self.count} {self.unit[:-1] if self.count == 1 else self.unit}"


@dataclass(frozen=True)
class OptimizerSettings:
    """The ``optimizer:`` section: which optimizer trains, and the formats of what it stores;
    a format None keeps fp32.

    ``kind`` is one of ``OPTIMIZER_KINDS`` (None: the trainer's choice, SGD by default).
    ``master`` is the stored weights themselves (a low-precision master is the LP-SGD / SWALP
    setting, and LP-SVRG's weight format), ``gradient`` the gradients the update reads,
    ``momentum`` SGD's momentum buffer or Adam's first moment, ``second_moment`` Adam's second
    moment. ``update_rounding`` rounds every stored value after a step (HALP's offset z too);
    ``weight_decay`` (None: the optimizer's own) is decoupled for AdamW and L2 otherwise, as torch
    does it. ``T`` is the SVRG / LP-SVRG / HALP epoch (steps between full gradients), ``mu`` and
    ``bits`` HALP's strong-convexity constant and offset word length; ``swa_start`` and
    ``swa_every`` when SWALP starts averaging and how often it adds an iterate. ``storage``:
    ``emulated`` keeps rounded states in fp32 tensors, ``packed`` keeps the ``momentum`` /
    ``second_moment`` states as codes of their format between steps (``formats.encode``), so an
    8-bit state takes a byte an element. ``momentum`` and ``second_moment`` (only they) may be
    block-wise codebook formats (``blockwise(dynamic8,256)``, bitsandbytes' 8-bit optimizer
    states), which round to nearest and leave parameters under 4096 elements in fp32.
    """

    kind: str | None = None
    master: Any = None
    gradient: Any = None
    momentum: Any = None
    second_moment: Any = None
    update_rounding: str = "nearest"
    weight_decay: float | None = None
    T: Period = Period(1, "epochs")
    mu: float | None = None
    bits: int = 8
    swa_start: Period = Period(1, "epochs")
    swa_every: Period = Period(1, "epochs")
    storage: str = "emulated"


@dataclass(frozen=True)
class TrustRegionSettings:
    """The ``trust_region:`` section: how the dynamic-precision controller steps and climbs.

    ``method`` is the trust-region method (steps of length Delta along -g/||g||, rho tests
    ``checks_per_epoch`` times an epoch) or ``mp_sgd`` (SGD steps of the trainer's lr, precision
    raised when eps > lr * eta / 2 * ||g||^2). ``epsilon`` is the loss error at a level:
    ``measured`` against fp32 on the batch (re-measured every ``refresh`` checks) or ``bound``,
    sum over ops of kappa * unit roundoff, times |loss|. ``lower_when_safe`` steps down a level
    after ``lower_patience`` checks in a row whose lower-level eps is below ``lower_margin`` times
    the threshold; ``per_layer`` raises the ops with the largest kappa * u first.
    """

    method: str = "trust_region"
    eta1: float = 0.25
    eta2: float = 0.75
    delta0: float = 0.1
    delta_max: float = 10.0
    checks_per_epoch: int = 50
    epsilon: str = "measured"
    refresh: int = 1
    momentum: float = 0.0
    weight_decay: float = 0.0
    eta: float = 0.5
    lower_when_safe: bool = False
    lower_margin: float = 0.5
    lower_patience: int = 3
    per_layer: bool = False


# what monitoring can record: an op's roles, and what the optimizer stores and applies
MONITOR_ROLES = ROLES + ("master", "momentum", "second_moment", "update")


@dataclass(frozen=True)
class MonitorSettings:
    """The ``monitor:`` section: what training records about its numbers, every ``every`` steps.

    ``ops`` selects the ops as rules' ``match`` does (any selector matching; none: every op
    with a quantized role), ``roles`` which of ``MONITOR_ROLES`` (``master``, ``momentum``,
    ``second_moment`` and ``update`` are the optimizer's, per parameter), ``histograms``
    whether to record the histogram of log2|x| beside the shares and SQNR.
    """

    every: int = 50
    ops: tuple[Selector, ...] = ()
    roles: tuple[str, ...] = MONITOR_ROLES
    histograms: bool = True


COMM_ROUNDINGS = ("nearest", "stochastic")


@dataclass(frozen=True)
class CommunicationSettings:
    """The ``communication:`` section: the format gradients travel in between data-parallel ranks.

    ``format`` is an element format of at most 16 bits (sent as uint8 / int16 codes) or an MX /
    BFP block format (codes and a scale byte per block); None: fp32, torch's own all-reduce.
    ``scaling`` of an element format: ``tensor`` (one power-of-two scale per bucket, from its
    amax), ``block`` (one per ``block_size`` elements) or ``none``. ``shared_scale``: every rank
    uses the largest rank's scale (one all-reduce of the amax first); otherwise each rank's scales
    travel with its codes. ``error_feedback``: a rank adds what rounding took from its gradient to
    the next step's (EF-SGD).
    """

    format: Any = None
    scaling: str = "tensor"
    block_size: int | None = None  # scaling: block(k)
    rounding: str = "nearest"
    error_feedback: bool = False
    shared_scale: bool = False
