"""HALP: bit centering makes 8-bit offsets converge linearly where LP-SGD stalls at its grid."""
from __future__ import annotations

import pytest
import torch

from finite_sum import LeastSquares
from mpcompile.formats import parse
from mpcompile.policy import OptimizerSettings
from mpcompile.runtime.optim import HALP, LowPrecisionOptimizer

PROBLEM = LeastSquares.random()
STEPS_PER_EPOCH = 8  # batches of 8 of 64 rows


def _halp(w: torch.nn.Parameter, **kwargs) -> HALP:
    return HALP([w], lr=0.1, T=STEPS_PER_EPOCH, full_grad=lambda: PROBLEM.loss(w).backward(), mu=0.1, bits=8,
                rounding="stochastic", **kwargs)


def _epoch(opt, w, epoch: int, on_step=None) -> None:
    for rows in PROBLEM.batches(8, epoch):
        opt.step(lambda: PROBLEM.loss(w, rows).backward())
        if on_step:
            on_step()


def test_halp_converges_linearly_in_8_bits_where_lp_sgd_stalls():
    w = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    opt = _halp(w)
    gaps, scales = [], []
    for epoch in range(25):
        _epoch(opt, w, epoch)
        gaps.append(PROBLEM.gap(w))
        scales.append(float(opt.state[w]["scale"]))
    assert all(later < earlier for earlier, later in zip(scales, scales[1:])), scales  # the grid refines
    assert gaps[-1] < 1e-10
    assert all(gaps[e + 5] < gaps[e] / 10 for e in range(5, 20)), gaps  # linear: 10x every 5 epochs

    v = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    lp_sgd = LowPrecisionOptimizer(torch.optim.SGD([v], lr=0.1),
                                   OptimizerSettings(master=parse("fixed(8,6)"), update_rounding="stochastic"))
    stalled = []
    for epoch in range(25):
        for rows in PROBLEM.batches(8, epoch):
            lp_sgd.zero_grad()
            PROBLEM.loss(v, rows).backward()
            lp_sgd.step()
        stalled.append(PROBLEM.gap(v))
    assert min(stalled[-10:]) > 1e-5 > 1e5 * gaps[-1]


def test_the_offset_is_exactly_on_its_8_bit_grid_at_every_step():
    w = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    opt = _halp(w)
    seen = []

    def check():
        state = opt.state[w]
        codes = state["codes"]
        assert codes.dtype == torch.int8
        assert torch.equal(w.detach(), state["anchor"] + codes.double() * state["scale"])
        seen.append(int(codes.abs().max()))

    for epoch in range(3):
        _epoch(opt, w, epoch, check)
    assert max(seen) > 0  # the offsets moved


def test_state_dict_resumes_bit_identically():
    def run(epochs, opt=None, w=None):
        w = w if w is not None else torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
        opt = opt or _halp(w)
        for epoch in epochs:
            _epoch(opt, w, epoch)
        return w, opt

    straight, _ = run(range(4))
    w, opt = run(range(2))
    state = opt.state_dict()
    resumed_w = torch.nn.Parameter(w.detach().clone())
    resumed = _halp(resumed_w)
    resumed.load_state_dict(state)
    assert resumed.state[resumed_w]["codes"].dtype == torch.int8
    run(range(2, 4), resumed, resumed_w)
    assert torch.equal(resumed_w, straight)


@pytest.mark.parametrize("kwargs, match", [({"mu": 0.0}, "mu"), ({"mu": 1.0, "bits": 1}, "bits")])
def test_bad_settings_are_refused(kwargs, match):
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=match):
        HALP([w], lr=0.1, T=1, full_grad=lambda: None, **kwargs)


def test_weight_decay_is_part_of_the_gradient_the_grid_shrinks_with():
    # the same objective with its L2 term as weight_decay: at the optimum g~ of the data term is
    # -lam w*, not 0, so a scale that left the decay out would stop refining and stall
    data_only = LeastSquares(PROBLEM.A, PROBLEM.b, 0.0)
    w = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    opt = HALP([w], lr=0.1, T=STEPS_PER_EPOCH, full_grad=lambda: data_only.loss(w).backward(), mu=0.1, bits=8,
               rounding="stochastic", weight_decay=PROBLEM.lam)
    for epoch in range(25):
        for rows in PROBLEM.batches(8, epoch):
            opt.step(lambda: data_only.loss(w, rows).backward())
    assert PROBLEM.gap(w) < 1e-10


def test_the_issues_positional_signature():
    w = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    opt = HALP([w], 0.1, STEPS_PER_EPOCH, lambda: PROBLEM.loss(w).backward(), 0.5, 6)
    assert (opt.mu, opt.bits, opt.T) == (0.5, 6, STEPS_PER_EPOCH)
