"""Every key of the policy schema does what it says: for each key of each section
(``parse.SECTION_KEYS``), two policies that differ only in that key, compiled on one small
model with one input and seed, give different outputs, gradients or lock files, or compile
warns that the key has no effect there. A key without a case here fails the test.

Keys of ``optimizer`` must also change an optimizer step; keys of the settings sections
(``default``, a rule, a level's ``set``) are tried in each of the three places.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import mpcompile
from mpcompile.errors import PolicyError
from mpcompile.policy import load_policy
from mpcompile.policy.parse import SECTION_KEYS
from mpcompile.runtime.optim import SWALP, VarianceReduced, make_optimizer

E4 = {"format": "fp8_e4m3"}


@dataclass(frozen=True)
class Case:
    """``base`` and ``variant`` (dicts; settings cases: one section's keys, placed by the test)
    and what tells them apart: ``numbers`` (the output or a gradient), ``lock`` (the lock file
    alone: what the runtime reads, or names), ``warns`` (text among the variant's warnings only),
    ``refused`` (the variant is not a policy), ``steps`` (two optimizer steps)."""

    base: dict
    variant: dict
    expect: str = "numbers"
    warns: str = ""
    where: tuple[str, ...] = ("default", "rule", "level")  # settings cases: the sections tried


def _no_effect(base: dict, variant: dict, text: str, **where) -> Case:
    return Case(base, variant, "warns", text, **where)


SETTINGS = {
    **{role: [Case({}, {role: "fp8_e4m3"})] for role in
       ("input", "weight", "bias", "output", "grad_output", "grad_input", "grad_weight", "grad_bias")},
    "forward": [Case({}, {"forward": {"acc": "bf16"}})],
    "backward": [Case({}, {"backward": {"acc": "bf16"}})],
    "recompute": [Case({"forward": {"acc": "fp8_e5m2"}}, {"forward": {"acc": "fp8_e5m2"}, "recompute": {"tau": 0.5}})],
    "rounding": [Case({"input": "fp8_e4m3"}, {"input": "fp8_e4m3", "rounding": "toward_zero"})],
    "saturate": [Case({"input": "e3m2"}, {"input": "e3m2", "saturate": True})],
    "keep": [Case({}, {"keep": "fp32"}, where=("rule", "level")),
             _no_effect({}, {"keep": "fp32"}, "default: changes nothing", where=("default",))],
}
ROLE = {
    "format": [Case({"input": E4}, {"input": {"format": "fp8_e5m2"}})],
    "rounding": [Case({"input": E4}, {"input": {**E4, "rounding": "toward_zero"}})],
    "saturate": [Case({"input": {"format": "e3m2"}}, {"input": {"format": "e3m2", "saturate": True}})],
    "sr_bits": [Case({"input": {**E4, "rounding": "stochastic"}}, {"input": {**E4, "rounding": "stochastic", "sr_bits": 1}}),
                _no_effect({"input": E4}, {"input": {**E4, "sr_bits": 3}}, "input.sr_bits has no effect")],
    "scaling": [Case({"input": E4}, {"input": {**E4, "scaling": "tensor"}})],
    "axis": [Case({"weight": {"format": "mxfp8_e4m3"}}, {"weight": {"format": "mxfp8_e4m3", "axis": -1}}),
             Case({"output": {"format": "fixed(8,4)", "scaling": "channel"}},  # fixed point: scales matter
                  {"output": {"format": "fixed(8,4)", "scaling": "channel", "axis": 0}}),
             _no_effect({"input": E4}, {"input": {**E4, "axis": 1}}, "input.axis has no effect")],
}
ARITH = {
    "mul": [Case({"acc": "bf16"}, {"acc": "bf16", "mul": "fp8_e4m3"})],
    "acc": [Case({"acc": "fp32", "order": "pairwise"}, {"acc": "bf16", "order": "pairwise"})],
    "order": [Case({"acc": "bf16"}, {"acc": "bf16", "order": "pairwise"})],
    "rounding": [Case({"acc": "bf16"}, {"acc": "bf16", "rounding": "toward_zero"})],
    "mul_rounding": [Case({"acc": "bf16", "mul": "bf16"}, {"acc": "bf16", "mul": "bf16", "mul_rounding": "up"}),
                     _no_effect({"acc": "bf16"}, {"acc": "bf16", "mul_rounding": "up"}, "mul_rounding has no effect")],
    "fma": [_no_effect({"acc": "bf16"}, {"acc": "bf16", "fma": True}, "forward.fma has no effect")],
    "kahan": [Case({"acc": "bf16"}, {"acc": "bf16", "kahan": True})],
    "sr_bits": [Case({"acc": "bf16", "rounding": "stochastic"}, {"acc": "bf16", "rounding": "stochastic", "sr_bits": 1}),
                _no_effect({"acc": "bf16"}, {"acc": "bf16", "sr_bits": 3}, "forward.sr_bits has no effect")],
}
RECOMPUTE = {
    "tau": [Case({"tau": "inf"}, {"tau": 0.5})],
    "forward": [Case({"tau": 0.5}, {"tau": 0.5, "forward": {"acc": "fp16"}})],
}
MATCH = {key: [Case({}, {key: value})] for key, value in
         {"type": "Linear", "name": "conv", "name_regex": "fc", "first": True, "last": True, "index": 1,
          "kappa_above": 1e30, "kappa_below": 1.5}.items()}
LEVEL = {
    "name": [Case({"name": "b"}, {"name": "c"}, "lock")],  # the lock names the level it resolved
    "set": [Case({}, {"set": {"input": "fp8_e4m3"}})],
    "keep": [Case({}, {"keep": "fp32"})],
    "rounding": [Case({"set": {"input": "fp8_e4m3"}}, {"set": {"input": "fp8_e4m3"}, "rounding": "toward_zero"})],
    "saturate": [Case({"set": {"input": "e3m2"}}, {"set": {"input": "e3m2"}, "saturate": True})],
}
OPTIMIZER = {key: [Case({}, {key: value}, "steps")] for key, value in
             {"master": "bf16", "gradient": "fp8_e5m2", "momentum": "fp8_e4m3", "second_moment": "bf16",
              "weight_decay": 0.5}.items()}
OPTIMIZER["second_moment"] = [Case({"kind": "adam"}, {"kind": "adam", "second_moment": "bf16"}, "steps")]
OPTIMIZER["update_rounding"] = [Case({"master": "bf16"}, {"master": "bf16", "update_rounding": "stochastic"}, "steps")]
OPTIMIZER |= {
    "kind": [Case({}, {"kind": "svrg"}, "steps")],
    "T": [Case({"kind": "svrg", "T": "1 step"}, {"kind": "svrg", "T": "3 steps"}, "steps")],
    "mu": [Case({"kind": "halp", "mu": 1}, {"kind": "halp", "mu": 4}, "steps")],
    "bits": [Case({"kind": "halp", "mu": 1}, {"kind": "halp", "mu": 1, "bits": 4}, "steps")],
    "swa_start": [Case({"kind": "swalp", "swa_start": "0 steps", "swa_every": "1 step"},
                       {"kind": "swalp", "swa_start": "2 steps", "swa_every": "1 step"}, "steps")],
    "storage": [Case({"kind": "adam", "momentum": "bf16"}, {"kind": "adam", "momentum": "bf16", "storage": "packed"},
                     "lock")],  # the same numbers by design (tests/runtime/optim), in fewer bytes
    "swa_every": [Case({"kind": "swalp", "swa_start": "0 steps"},
                       {"kind": "swalp", "swa_start": "0 steps", "swa_every": "1 step"}, "steps")],
}
TRUST_REGION = {key: [Case({}, {key: value}, "lock")] for key, value in
                {"method": "mp_sgd", "eta1": 0.1, "eta2": 0.9, "delta0": 0.2, "delta_max": 5.0, "checks_per_epoch": 7,
                 "epsilon": "bound", "refresh": 3, "momentum": 0.5, "weight_decay": 0.01, "eta": 0.25,
                 "lower_when_safe": True, "lower_margin": 0.25, "lower_patience": 5, "per_layer": True}.items()}
# monitoring reads its section while training (tests/runtime/test_monitor.py); compile carries it into the lock
MONITOR = {key: [Case({"every": 50}, {"every": 50, key: value}, "lock")] for key, value in
           {"every": 10, "ops": {"type": "Linear"}, "roles": ["weight"], "histograms": False}.items()}
# the communication hook reads its section while training (tests/runtime/distributed); compile carries it into the lock
COMMUNICATION = {key: [Case({"format": "fp8_e5m2"}, {"format": "fp8_e5m2", key: value}, "lock")] for key, value in
                 {"scaling": "block(32)", "rounding": "stochastic", "error_feedback": True,
                  "shared_scale": True}.items()}
COMMUNICATION["format"] = [Case({"format": "fp8_e5m2"}, {"format": "bf16"}, "lock")]
POLICY = {
    "version": [Case({"version": 1}, {"version": 2}, "refused")],
    "name": [Case({"name": "a"}, {"name": "b"}, "lock")],
    "description": [Case({"description": "a"}, {"description": "b"}, "lock")],
    "formats": [Case({"formats": {"lo": "fp8_e4m3"}, "default": {"input": "lo"}},
                     {"formats": {"lo": "fp8_e5m2"}, "default": {"input": "lo"}})],
    "rounding": [Case({"default": {"input": "fp8_e4m3"}}, {"default": {"input": "fp8_e4m3"}, "rounding": "up"})],
    "saturate": [Case({"default": {"input": "e3m2"}}, {"default": {"input": "e3m2"}, "saturate": True})],
    "default": [Case({}, {"default": {"input": "fp8_e4m3"}})],
    "rules": [Case({}, {"rules": [{"match": {"type": "relu"}, "output": "fp8_e4m3"}]})],
    "levels": [Case({"default": {"input": "bf16"}, "levels": [{"name": "a"}]},
                    {"default": {"input": "bf16"}, "levels": [{"name": "a"}, {"name": "b", "set": {"input": "fp8_e4m3"}}]})],
    "trust_region": [Case({}, {"trust_region": {"delta0": 0.2}}, "lock")],
    "optimizer": [Case({}, {"optimizer": {"master": "bf16"}}, "steps")],
    "strict": [Case({}, {"strict": True}, "lock")],
    "monitor": [Case({}, {"monitor": {"every": 10}}, "lock")],
    "communication": [Case({}, {"communication": {"format": "bf16"}}, "lock")],
}
RULE = {"match": [Case({"match": {"type": "Conv2d"}, "input": "fp8_e4m3"}, {"match": {"type": "Linear"}, "input": "fp8_e4m3"})]}
CASES = {"policy": POLICY, "settings": SETTINGS, "role": ROLE, "arithmetic": ARITH, "recompute": RECOMPUTE,
         "rule": RULE, "match": MATCH, "level": LEVEL, "optimizer": OPTIMIZER, "trust_region": TRUST_REGION,
         "monitor": MONITOR, "communication": COMMUNICATION}
# a base every level case quantizes (a level only changes what is quantized below it)
LEVEL_BASE = {**{role: "bf16" for role in SETTINGS if role.startswith(("input", "weight", "bias", "output", "grad"))},
              "forward": {"acc": "fp32", "order": "pairwise"}, "backward": {"acc": "fp32", "order": "pairwise"}}


def _place(section: str, where: str, settings: dict) -> dict:
    """A whole policy around one section's keys: ``where`` it sits for settings keys."""
    if section == "policy":
        return {"version": 1, **settings}
    if section == "settings":
        return {"default": {"version": 1, "default": settings},
                "rule": {"version": 1, "default": {"input": "fp8_e4m3"}, "rules": [{"match": {}, **settings}]},
                "level": {"version": 1, "default": LEVEL_BASE, "levels": [{"name": "a"}, {"name": "b", "set": settings}]},
                }[where]
    if section in ("role", "recompute", "arithmetic"):
        body = settings if section == "role" else {"recompute": settings} if section == "recompute" else \
            {"forward": settings}
        base = {"forward": {"acc": "fp8_e5m2"}} if section == "recompute" else {}
        return {"version": 1, "default": {**base, **body}}
    if section == "rule":
        return {"version": 1, "rules": [settings]}
    if section == "match":
        return {"version": 1, "rules": [{"match": settings, "input": "fp8_e4m3"}]}
    if section == "level":
        return {"version": 1, "default": {"input": "bf16"}, "levels": [{"name": "a"}, {"name": "b", **settings}]}
    return {"version": 1, section: settings}


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 16, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


X = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
X[0, 0, 0, 0] = 100.0  # past e3m2's 28, so that saturate matters there (SAT), and within every other format
G = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.int32).numpy().tobytes()


def _outcome(policy: dict) -> tuple[tuple, str, list[str]]:
    """(output and gradient bits, the lock, the warnings) of the model compiled under ``policy``
    at its top level; calibrated only where a rule selects on kappa (the passes cost time)."""
    p = load_policy(copy.deepcopy(policy))
    torch.manual_seed(0)
    model = Small()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = mpcompile.compile(model, p, (X,), level=max(0, len(p.levels) - 1),
                               calibration=None if p.wants_calibration else [])
    torch.manual_seed(1)
    x = X.clone().requires_grad_()
    cm(x).backward(G)
    torch.manual_seed(1)
    y = cm(X)
    grads = [x.grad] + [q.grad for q in model.parameters()]
    return (_bits(y), *(_bits(g) for g in grads if g is not None)), cm.to_json(), cm.warnings


def _step(policy: dict) -> bytes:
    """Four steps of the policy's optimizer kind (adam where it names none) on alternating halves
    of X (the full gradient: all of X); the weights, and SWALP's average."""
    p = load_policy(copy.deepcopy(policy))
    torch.manual_seed(0)
    model = Small()
    full = lambda: model(X).backward(G)  # noqa: E731
    opt = make_optimizer(p.optimizer.kind or "adam", model.parameters(), 0.1, p.optimizer, seed=0,
                         steps_per_epoch=2, full_grad=full)
    for i in range(4):
        half = slice(i % 2, None, 2)
        closure = lambda: model(X[half]).backward(G[half])  # noqa: E731
        if isinstance(opt, VarianceReduced):
            opt.step(closure)
        else:
            opt.zero_grad()
            closure()
            opt.step()
    average = opt.average if isinstance(opt, SWALP) else []
    return b"".join(_bits(q) for q in [*model.parameters(), *average])


def _cases() -> list:
    return [pytest.param(section, key, where, case, id=f"{section}.{key}{'@' + where if where else ''}[{i}]")
            for section, keys in SECTION_KEYS.items() for key in keys
            for i, case in enumerate(CASES.get(section, {}).get(key, [None]))
            for where in (case.where if case is not None and section == "settings" else ("",))]


@pytest.mark.parametrize("section,key,where,case", _cases())
def test_every_key_changes_what_runs_or_says_it_does_not(section, key, where, case):
    assert case is not None, f"no case for {section}.{key}: add one to tests/policy/test_every_key.py"
    base, variant = _place(section, where, case.base), _place(section, where, case.variant)
    if case.expect == "refused":
        load_policy(base)
        with pytest.raises(PolicyError):
            load_policy(variant)
        return
    if case.expect == "steps":
        assert _step(base) != _step(variant)
        return
    (numbers_a, lock_a, warned_a), (numbers_b, lock_b, warned_b) = _outcome(base), _outcome(variant)
    if case.expect == "warns":
        assert any(case.warns in w for w in warned_b) and not any(case.warns in w for w in warned_a), warned_b
    elif case.expect == "lock":
        assert lock_a != lock_b
    else:
        assert numbers_a != numbers_b


def test_the_lock_carries_what_the_runtime_reads():
    policy = {"version": 1, "optimizer": {"master": "bf16", "update_rounding": "stochastic"},
              "trust_region": {"delta0": 0.2, "per_layer": True}, "strict": True,
              "monitor": {"every": 7, "ops": [{"type": "Linear"}, {"name_regex": "conv.*", "first": True}],
                          "roles": ["weight", "master"], "histograms": False}}
    cm = mpcompile.compile(Small(), policy, (X,))
    again = load_policy(__import__("json").loads(cm.to_json()))
    p = load_policy(policy)
    assert (again.optimizer, again.trust_region, again.strict) == (p.optimizer, p.trust_region, p.strict)
    assert (again.monitor.every, again.monitor.roles, again.monitor.histograms) == (7, ("weight", "master"), False)
    assert [s.type for s in again.monitor.ops] == [("Linear",), ()]
    assert again.monitor.ops[1].name_regex.pattern == "conv.*" and again.monitor.ops[1].first
