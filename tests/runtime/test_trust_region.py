"""The trust-region controller on problems whose loss error at each level is known exactly.

f^(x) = f(x) + eps_level * sin(3 * sum(x) + 1), so |f^ - f| <= eps_level everywhere, and the
objective reports eps_level as its error: the mechanism can be checked against its own theory.
"""
from __future__ import annotations

import math

import pytest
import torch

from mpcompile.policy import TrustRegionSettings
from mpcompile.runtime.trust_region import Check, TrustRegion

F64 = {"dtype": torch.float64}


class Synthetic:
    """f with a perturbation of exactly eps per level; level ``i`` has error ``eps[i]``."""

    def __init__(self, f, x0: torch.Tensor, eps: list[float], level: int = 0):
        self.f, self.eps, self.index = f, eps, level
        self.params = [x0.clone()]
        self.evaluations = 0

    def fhat(self, x):
        return self.f(x) + self.eps[self.index] * torch.sin(3 * x.sum() + 1)

    def true_loss(self) -> float:
        return float(self.f(self.params[0]))

    def loss_and_grad(self, batch):
        x = self.params[0].detach().requires_grad_()
        value = self.fhat(x)
        (g,) = torch.autograd.grad(value, x)
        return float(value.detach()), [g]

    def loss(self, batch):
        return float(self.fhat(self.params[0]))

    def error(self, batch):
        return self.eps[self.index]

    def error_lower(self, batch):
        return None if self.index == 0 else self.eps[self.index - 1]

    def raise_precision(self):
        if self.index == len(self.eps) - 1:
            return False
        self.index += 1
        return True

    def lower_precision(self):
        if self.index == 0:
            return False
        self.index -= 1
        return True

    def after_update(self):
        pass

    @property
    def level(self):
        return str(self.index)


def quadratic():
    a = torch.linspace(1.0, 10.0, 10, **F64)
    return (lambda x: 0.5 * (a * x * x).sum()), torch.ones(10, **F64), 0.0


def logistic():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200, 5, generator=gen, **F64)
    y = (z @ torch.tensor([1.0, -2.0, 0.5, 0.0, 1.5], **F64) + 0.8 * torch.randn(200, generator=gen, **F64) > 0).double()

    def f(w):
        return torch.nn.functional.binary_cross_entropy_with_logits(z @ w, y)

    w = torch.zeros(5, **F64).requires_grad_()  # f*: L-BFGS to convergence, in float64
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")
    opt.step(lambda: (opt.zero_grad(), f(w).backward(), f(w))[2])
    return f, torch.zeros(5, **F64), float(f(w.detach()))


LADDER = [1e-1, 1e-2, 1e-4, 1e-7, 0.0]
EVERY_STEP = TrustRegionSettings(checks_per_epoch=1, delta0=0.1, delta_max=4.0)


def run(problem, eps, iterations, settings=EVERY_STEP):
    f, x0, _ = problem
    obj = Synthetic(f, x0, eps)
    events = []
    before = {"x": obj.params[0].clone(), "f": obj.true_loss()}

    def on_check(check: Check):
        x = obj.params[0]
        events.append((check, before["x"].clone(), before["f"], x.clone(), obj.true_loss(), obj.index))
        if not check.raised:
            before.update(x=x.clone(), f=obj.true_loss())

    tr = TrustRegion(obj, settings, steps_per_epoch=1, on_check=on_check)
    for _ in range(iterations):
        tr.step(None)
    return obj, tr, events


@pytest.mark.parametrize("problem", [quadratic, logistic], ids=["quadratic", "logistic"])
def test_mechanism_holds_check_by_check(problem):
    problem = problem()
    s = EVERY_STEP
    obj, tr, events = run(problem, LADDER, 300)
    assert events and any(c.raised for c, *_ in events) and any(not c.accepted and not c.raised for c, *_ in events)
    top = len(LADDER) - 1
    for check, x_before, f_before, x_after, f_after, index in events:
        unmet = not check.eps < s.eta1 * check.pred / 2
        assert check.criterion_met == (not unmet) or check.raised
        # raised exactly when the criterion fails below the top of the ladder
        assert (unmet and index == int(check.level) + 1) if check.raised else (not unmet or index == top)
        if check.raised:
            assert torch.equal(x_after, x_before)  # no step at the lower precision
        elif check.accepted:
            assert f_after < f_before  # true decrease of at least eta1 * pred - 2 eps > 0
            if check.criterion_met:
                assert f_before - f_after >= s.eta1 * check.pred - 2 * check.eps - 1e-15
        else:
            assert torch.equal(x_after, x_before)  # a rejected step is undone bit for bit
    assert tr.unmet == 0  # the exact top level always meets the criterion


@pytest.mark.parametrize("problem", [quadratic, logistic], ids=["quadratic", "logistic"])
def test_converges_where_fixed_low_precision_stalls(problem):
    problem = problem()
    f_star = problem[2]
    climbing, _, _ = run(problem, LADDER, 400)
    fixed, tr_fixed, _ = run(problem, LADDER[:1], 400)
    assert climbing.true_loss() - f_star < 1e-8
    assert fixed.true_loss() - f_star > 1e-4  # stuck at the scale of its error, 0.1
    assert tr_fixed.unmet > 0


def test_rejects_halve_delta_accepts_double_it():
    obj, tr, events = run(quadratic(), LADDER, 100)
    delta = EVERY_STEP.delta0
    for check, *_ in events:
        if check.raised:
            assert check.delta == delta
            continue
        rho = check.rho
        delta = min(2 * delta, EVERY_STEP.delta_max) if rho >= EVERY_STEP.eta2 else \
            delta if rho >= EVERY_STEP.eta1 else delta / 2
        assert check.delta == delta and check.accepted == (rho >= EVERY_STEP.eta1)


def test_checks_per_epoch_spaces_the_checks():
    f, x0, _ = quadratic()
    obj = Synthetic(f, x0, [0.0])
    iterations = []
    tr = TrustRegion(obj, TrustRegionSettings(checks_per_epoch=5), steps_per_epoch=20,
                     on_check=lambda c: iterations.append(c.iteration))
    for _ in range(40):
        tr.step(None)
    assert iterations == [1 + 4 * i for i in range(10)]


def test_mp_sgd_raises_when_eps_exceeds_its_threshold():
    f, x0, _ = quadratic()
    settings = TrustRegionSettings(method="mp_sgd", checks_per_epoch=1, eta=0.5)
    obj = Synthetic(f, x0, LADDER)
    checks = []
    tr = TrustRegion(obj, settings, steps_per_epoch=1, lr=0.05, on_check=checks.append)
    for _ in range(300):
        tr.step(None)
    raised = [c for c in checks if c.raised]
    assert len(raised) == len(LADDER) - 1
    for c in checks:
        threshold = 0.05 * 0.5 / 2 * (c.pred / 0.05)  # pred = lr * ||g||^2 without momentum
        assert c.criterion_met == (c.eps < threshold)
        assert c.raised == (not c.criterion_met and c.level != str(len(LADDER) - 1))
    assert obj.true_loss() < 1e-10


def test_lowers_after_patience_safe_checks():
    """eps of level 0 is large for 10 iterations and then tiny: the controller climbs, then comes
    back down exactly lower_patience checks after the lower level became safe."""
    f, x0, _ = quadratic()
    obj = Synthetic(lambda x: x.sum(), x0, [1.0, 0.0])  # linear: ||g|| stays sqrt(10)
    phase = {"i": 0}
    obj.error_lower = lambda batch: None if obj.index == 0 else (1.0 if phase["i"] < 10 else 1e-9)
    obj.error = lambda batch: obj.eps[obj.index] if obj.index or phase["i"] < 10 else 1e-9
    settings = TrustRegionSettings(checks_per_epoch=1, lower_when_safe=True, lower_patience=3, delta_max=0.1)
    checks = []
    tr = TrustRegion(obj, settings, steps_per_epoch=1, on_check=checks.append)
    for i in range(20):
        phase["i"] = i
        tr.step(None)
    assert checks[0].raised and obj.index == 0
    lowered = [c.iteration for c in checks if c.lowered]
    assert lowered == [10 + 3]  # iterations 11, 12, 13 safe (1-based)


def test_momentum_direction_and_weight_decay():
    """The second step runs along mu * d_1 + g_2 (g with weight decay wd * x added)."""
    f, x0, _ = quadratic()
    obj = Synthetic(f, x0, [0.0])
    mu, wd = 0.9, 0.01
    checks = []
    tr = TrustRegion(obj, TrustRegionSettings(checks_per_epoch=1, momentum=mu, weight_decay=wd),
                     steps_per_epoch=1, on_check=checks.append)

    def grad(x):
        x = x.clone().requires_grad_()
        return torch.autograd.grad(f(x), x)[0] + wd * x.detach()

    x = [obj.params[0].clone()]
    for _ in range(2):
        tr.step(None)
        x.append(obj.params[0].clone())
    assert all(c.accepted for c in checks)
    d2 = mu * grad(x[0]) + grad(x[1])
    move = x[1] - x[2]
    assert torch.allclose(move, checks[0].delta * d2 / d2.norm(), rtol=1e-12, atol=0)  # Delta as the 1st left it
    for _ in range(300):
        tr.step(None)
    assert obj.true_loss() < 1e-6  # the minimiser of f + wd/2 ||x||^2 is still 0


def test_state_dict_resumes_identically():
    f, x0, _ = quadratic()
    a = Synthetic(f, x0, LADDER)
    tr_a = TrustRegion(a, TrustRegionSettings(checks_per_epoch=3, momentum=0.5), steps_per_epoch=10)
    for _ in range(25):
        tr_a.step(None)
    b = Synthetic(f, a.params[0], LADDER, level=a.index)
    tr_b = TrustRegion(b, TrustRegionSettings(checks_per_epoch=3, momentum=0.5), steps_per_epoch=10)
    tr_b.load_state_dict(tr_a.state_dict())
    for _ in range(25):
        tr_a.step(None)
        tr_b.step(None)
    assert torch.equal(a.params[0], b.params[0]) and tr_a.delta == tr_b.delta and a.index == b.index


def test_mp_sgd_needs_lr():
    f, x0, _ = quadratic()
    with pytest.raises(ValueError, match="positive lr"):
        TrustRegion(Synthetic(f, x0, [0.0]), TrustRegionSettings(method="mp_sgd"), steps_per_epoch=1)
    assert math.isfinite(EVERY_STEP.delta0)
