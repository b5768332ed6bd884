"""LowPrecisionOptimizer: torch's update, with what it stores rounded to the policy's formats."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import mpcompile
from mpcompile.errors import MpcompileError
from mpcompile.formats import parse
from mpcompile.policy import OptimizerSettings
from mpcompile.rounding import quantize
from mpcompile.runtime.optim import LowPrecisionOptimizer, make_optimizer


def _model_with_grads(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 3))
    model(torch.randn(8, 6)).square().sum().backward()
    return model


def _grads_like(model: nn.Module, source: nn.Module) -> None:
    for p, q in zip(model.parameters(), source.parameters()):
        p.grad = q.grad.clone()


def test_fp32_settings_are_torchs_optimizer_to_the_bit():
    model = _model_with_grads()
    reference = copy.deepcopy(model)
    _grads_like(reference, model)
    opt = make_optimizer("adam", model.parameters(), 1e-2)
    ref = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for _ in range(3):
        opt.step()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


def test_low_precision_master_gradient_and_momentum_round_around_torchs_step():
    settings = OptimizerSettings(master=parse("bf16"), gradient=parse("fp8_e5m2"), momentum=parse("e4m3"))
    model = _model_with_grads()
    reference = copy.deepcopy(model)
    _grads_like(reference, model)
    opt = make_optimizer("sgd", model.parameters(), 0.1, settings)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(quantize(p, "bf16"))  # the weights are stored in the master format from the start
            p.grad = quantize(p.grad, "fp8_e5m2")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt.step()
    ref.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, quantize(q, "bf16"))
        assert torch.equal(opt.optimizer.state[p]["momentum_buffer"], quantize(ref.state[q]["momentum_buffer"], "e4m3"))


def test_block_formats_make_8_bit_adam_states():
    settings = OptimizerSettings(momentum=parse("mxfp8_e4m3"), second_moment=parse("mxfp8_e5m2"))
    model = _model_with_grads()
    reference = copy.deepcopy(model)
    _grads_like(reference, model)
    opt, ref = make_optimizer("adamw", model.parameters(), 1e-2, settings), torch.optim.AdamW(reference.parameters(), lr=1e-2)
    opt.step()
    ref.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)  # the first step reads states before they are rounded
        state, want = opt.optimizer.state[p], ref.state[q]
        assert torch.equal(state["exp_avg"], quantize(want["exp_avg"], "mxfp8_e4m3"))
        assert torch.equal(state["exp_avg_sq"], quantize(want["exp_avg_sq"], "mxfp8_e5m2"))


def test_stochastic_updates_are_reproducible_and_resume_from_the_state_dict():
    settings = OptimizerSettings(master=parse("bf16"), update_rounding="stochastic")

    def run(steps: int, model=None, state=None):
        model = model or _model_with_grads()
        opt = make_optimizer("sgd", model.parameters(), 1e-3, settings, seed=7)
        if state is not None:
            opt.load_state_dict(state)
        for _ in range(steps):
            opt.step()
        return model, opt

    straight, _ = run(4)
    half, opt = run(2)
    resumed, _ = run(2, half, copy.deepcopy(opt.state_dict()))
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))
    nearest = _model_with_grads()
    plain = make_optimizer("sgd", nearest.parameters(), 1e-3, OptimizerSettings(master=parse("bf16")))
    for _ in range(4):
        plain.step()
    assert not all(torch.equal(p, q) for p, q in zip(straight.parameters(), nearest.parameters()))
    assert all(torch.equal(p, quantize(p, "bf16")) for p in straight.parameters())


def test_weight_decay_from_the_policy_reaches_torch():
    model = _model_with_grads()
    opt = make_optimizer("sgd", model.parameters(), 0.1, OptimizerSettings(weight_decay=0.01))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01]


def test_the_optimizer_survives_recompile():
    model = _model_with_grads()
    cm = mpcompile.compile(model, "hfp8")
    opt = make_optimizer("sgd", cm.parameters(), 0.1)
    cm.recompile(level="fp16")
    before = [p.clone() for p in model.parameters()]
    opt.zero_grad()
    cm(torch.randn(4, 6)).square().sum().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_bad_optimizer_input():
    params = list(_model_with_grads().parameters())
    with pytest.raises(MpcompileError, match="unknown optimizer 'rmsprop'; choose one of sgd, adam, adamw"):
        make_optimizer("rmsprop", params, 0.1)
    with pytest.raises(MpcompileError, match="learning rate -1 must be positive"):
        make_optimizer("sgd", params, -1)
    assert isinstance(make_optimizer("sgd", params, 0.1), LowPrecisionOptimizer)


def test_a_stored_value_past_a_format_without_inf_saturates():
    w = nn.Parameter(torch.tensor([0.45, -0.45]))
    opt = make_optimizer("sgd", [w], 0.1, OptimizerSettings(master=parse("fixed(8,8)")), momentum=0.0)
    w.grad = torch.tensor([-1.0, 1.0])
    opt.step()
    assert w.tolist() == [127 / 256, -0.5]  # fixed(8,8)'s max and min, not NaN
    v = nn.Parameter(torch.tensor([3e38]))
    opt = make_optimizer("sgd", [v], 1.0, OptimizerSettings(master=parse("bf16")), momentum=0.0)
    v.grad = torch.tensor([-1e38])
    opt.step()
    assert v.item() == float("inf")  # bf16 has inf: overflow stays visible


def test_packed_states_train_bit_identically_in_a_quarter_of_the_bytes(tmp_path):
    from mpcompile.policy import load_policy

    def run(storage: str, steps: int, state=None):
        policy = load_policy({"version": 1, "optimizer": {"kind": "adam", "momentum": "mxfp8_e4m3",
                                                          "second_moment": "mxfp8_e5m2",
                                                          "update_rounding": "stochastic", "storage": storage}})
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        opt = make_optimizer("adam", model.parameters(), 1e-2, policy.optimizer, seed=3)
        if state is not None:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
        for _ in range(steps):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return model, opt

    emulated, emulated_opt = run("emulated", 4)
    packed, packed_opt = run("packed", 4)
    assert all(torch.equal(a, b) for a, b in zip(emulated.parameters(), packed.parameters()))
    assert packed_opt.state_bytes() < 0.3 * emulated_opt.state_bytes()
    path = tmp_path / "ckpt.pt"  # a checkpoint holds the codes, and resumes bit-identically
    half, half_opt = run("packed", 2)
    torch.save((half.state_dict(), half_opt.state_dict()), path)
    assert all(v[0].dtype == torch.uint8 for v in half_opt.state_dict()["packed"].values())
    resumed, _ = run("packed", 2, torch.load(path, weights_only=False))
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), packed.parameters()))
