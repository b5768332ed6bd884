"""SWALP: the fp32 average of low-precision SGD iterates, with batch norms recomputed for it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from mpcompile.formats import parse
from mpcompile.policy import OptimizerSettings
from mpcompile.rounding import quantize
from mpcompile.runtime.optim import SWALP, LowPrecisionOptimizer

SETTINGS = OptimizerSettings(master=parse("fixed(8,6)"), update_rounding="stochastic")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _swalp(model: nn.Module, start: int = 3, every: int = 2) -> SWALP:
    inner = LowPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), SETTINGS, seed=1)
    return SWALP(inner, start, every)


def _step(model: nn.Module, opt: SWALP, i: int) -> None:
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(i))
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_the_average_is_the_mean_of_the_iterates_from_start_every_c_steps():
    model = _model()
    opt = _swalp(model)
    averaged = []
    for i in range(1, 11):
        _step(model, opt, i)
        w = [p.detach().clone() for p in model.parameters()]
        assert all(torch.equal(p, quantize(p, "fixed(8,6)")) for p in w)  # low-precision iterates
        if i >= 3 and (i - 3) % 2 == 0:
            averaged.append(w)
    assert opt.averaged_count == len(averaged) == 4
    for avg, *iterates in zip(opt.average, *averaged):
        assert avg.dtype == torch.float32
        torch.testing.assert_close(avg, torch.stack(iterates).double().mean(0).float(), rtol=0, atol=1e-7)


def test_averaged_swaps_in_the_average_with_recomputed_batch_norm_and_puts_everything_back():
    model = _model()
    opt = _swalp(model, start=0, every=1)
    with pytest.raises(RuntimeError, match="no iterate averaged"):
        with opt.averaged(model):
            pass
    for i in range(1, 6):
        _step(model, opt, i)
    loader = [torch.randn(32, 5, generator=torch.Generator().manual_seed(100 + i)) for i in range(3)]
    weights, stats = copy.deepcopy(model.state_dict()), model[1].running_mean.clone()
    expected = copy.deepcopy(model)
    with torch.no_grad():
        for p, avg in zip(expected.parameters(), opt.average):
            p.copy_(avg)
    torch.optim.swa_utils.update_bn(loader, expected)
    with opt.averaged(model, loader):
        assert all(torch.equal(p, avg) for p, avg in zip(model.parameters(), opt.average))
        assert torch.equal(model[1].running_mean, expected[1].running_mean)
        assert not torch.equal(model[1].running_mean, stats)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_state_dict_resumes_bit_identically():
    straight_model = _model()
    straight = _swalp(straight_model)
    for i in range(1, 9):
        _step(straight_model, straight, i)
    model = _model()
    opt = _swalp(model)
    for i in range(1, 5):
        _step(model, opt, i)
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    model = _model()
    model.load_state_dict(weights)
    opt = _swalp(model)
    opt.load_state_dict(state)
    for i in range(5, 9):
        _step(model, opt, i)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), straight_model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(opt.average, straight.average))
    assert opt.averaged_count == straight.averaged_count


def test_batch_norms_are_recomputed_through_an_fx_graph_and_refused_through_an_exported_one():
    import warnings

    import mpcompile

    x = torch.randn(16, 5)
    loader = [torch.randn(32, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for capture in ("fx", "export"):
        model = _model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = mpcompile.compile(model, "bf16", (x,), capture=capture)
        opt = _swalp(compiled, start=0, every=1)
        for i in range(1, 4):
            _step(compiled, opt, i)
        if capture == "export":
            with pytest.raises(ValueError, match="captured by torch.export"):
                with opt.averaged(compiled, loader):
                    pass
            with opt.averaged(compiled.source, loader):  # the source's own batch norms: allowed
                pass
            continue
        expected = copy.deepcopy(model)
        with torch.no_grad():
            for p, avg in zip(expected.parameters(), opt.average):
                p.copy_(avg)
        torch.optim.swa_utils.update_bn(loader, expected)
        with opt.averaged(compiled, loader):  # through the bf16 graph: close to the fp32 statistics
            torch.testing.assert_close(model[1].running_mean, expected[1].running_mean, rtol=0, atol=2e-2)
