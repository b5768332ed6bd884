"""SVRG and LP-SVRG against a float64 reference, step for step; the two-gradient step's contract."""
from __future__ import annotations

import pytest
import torch

from finite_sum import LeastSquares
from mpcompile.formats import parse
from mpcompile.rounding import quantize
from mpcompile.runtime.optim import LPSVRG, SVRG, full_gradient

PROBLEM = LeastSquares.random()
LR, T = 0.05, 8


def _reference(epochs: int, master=None) -> list[torch.Tensor]:
    """SVRG written out: every T steps w~ = w, g~ = grad f(w~); w -= lr (g_i(w) - g_i(w~) + g~)."""
    w, iterates = torch.zeros(6, dtype=torch.float64), []
    for epoch in range(epochs):
        anchor, full = w.clone(), PROBLEM.grad(w)
        for rows in PROBLEM.batches(8, epoch):
            w = w - LR * (PROBLEM.grad(w, rows) - PROBLEM.grad(anchor, rows) + full)
            if master is not None:
                w = quantize(w, master)
            iterates.append(w)
    return iterates


@pytest.mark.parametrize("master", [None, parse("fixed(8,5)")], ids=["svrg", "lpsvrg"])
def test_matches_a_float64_reference_step_for_step(master):
    w = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    full = lambda: PROBLEM.loss(w).backward()  # noqa: E731
    opt = SVRG([w], LR, T, full) if master is None else LPSVRG([w], LR, T, full, master=master)
    want = iter(_reference(3, master))
    for epoch in range(3):
        for rows in PROBLEM.batches(8, epoch):
            opt.step(lambda: PROBLEM.loss(w, rows).backward())
            expected = next(want)
            torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-15)
            if master is not None:
                assert torch.equal(w.detach(), quantize(w.detach(), master))  # stored in the format


def test_full_gradient_from_uneven_batches_is_the_whole_data_gradient():
    w = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    rows = torch.arange(64).split(10)  # 6 batches of 10, one of 4
    data = [(PROBLEM.A[r], PROBLEM.b[r]) for r in rows]

    def grad_fn(batch):
        a, b = batch
        loss = 0.5 * (a @ w - b).square().mean() + 0.5 * PROBLEM.lam * w.square().sum()
        loss.backward()
        return loss

    (got,) = full_gradient([w], data, grad_fn)
    torch.testing.assert_close(got, PROBLEM.grad(w.detach()), rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match="grad_fn"):
        full_gradient([w], data)
    with pytest.raises(TypeError, match="one-shot"):
        full_gradient([w], iter(data), grad_fn)


def test_the_anchor_gradient_sees_the_anchor_and_the_same_random_numbers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    x = torch.randn(16, 4)
    opt = SVRG(model.parameters(), 0.1, 100, lambda: model(x).square().mean().backward())
    opt.step(lambda: model(x).square().mean().backward())  # anchors at step 0, moves w away
    calls = []

    def closure():
        calls.append((model[0].weight.detach().clone(), torch.rand(3)))
        loss = model(x).square().mean()
        loss.backward()
        return loss

    before = model[0].weight.detach().clone()
    opt.step(closure)
    (w_seen, draw_w), (anchor_seen, draw_anchor) = calls
    assert torch.equal(w_seen, before)
    assert torch.equal(anchor_seen, opt.state[model[0].weight]["anchor"]) and not torch.equal(anchor_seen, before)
    assert torch.equal(draw_w, draw_anchor)  # same dropout masks at w and w~
    assert not torch.equal(torch.rand(3), draw_w)  # and the random stream goes on afterwards


def test_a_failing_or_non_finite_step_leaves_the_weights_as_they_were():
    w = torch.nn.Parameter(torch.ones(3))
    opt = SVRG([w], 0.1, 10, lambda: w.square().sum().backward())
    calls = []

    def raising():
        calls.append(1)
        if len(calls) == 2:  # the call at the anchor
            raise RuntimeError("boom")
        w.square().sum().backward()

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(raising)
    assert torch.equal(w.detach(), torch.ones(3)) and w.data is not opt.state[w]["anchor"]
    opt.step(lambda: (w * float("inf")).sum().backward())
    assert torch.equal(w.detach(), torch.ones(3)) and opt.steps == 0


def test_state_dict_resumes_bit_identically():
    def run(epochs, w=None, state=None):
        w = w if w is not None else torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
        opt = LPSVRG([w], LR, T, lambda: PROBLEM.loss(w).backward(), master=parse("fixed(8,5)"),
                     rounding="stochastic", seed=3)
        if state:
            opt.load_state_dict(state)
        for epoch in epochs:
            for rows in PROBLEM.batches(8, epoch):
                opt.step(lambda: PROBLEM.loss(w, rows).backward())
        return w, opt

    straight, _ = run(range(3))
    w, opt = run(range(1))
    resumed, _ = run(range(1, 3), torch.nn.Parameter(w.detach().clone()), opt.state_dict())
    assert torch.equal(resumed, straight)
