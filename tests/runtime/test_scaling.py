"""Loss scaling: exact unscaling, overflow detection, the dynamic schedule, state and specs."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import mpcompile
from mpcompile.errors import MpcompileError
from mpcompile.formats import parse
from mpcompile.runtime.scaling import (DynamicLossScaler, DynamicScalingConfig, LossScaler, ScalingError,
                                       StaticLossScaler, make_loss_scaler)


def _param(*values: float) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(len(values)))
    p.grad = torch.tensor(values)
    return p


def _model_grads(scaler: LossScaler | None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, target = torch.randn(8, 6), torch.randn(8, 3)
    loss = nn.functional.mse_loss(model(x), target)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        assert scaler.unscale_(model.parameters()) is False
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("scaler", [StaticLossScaler(2.0**10), DynamicLossScaler(), StaticLossScaler(2.0**-3)])
def test_power_of_two_unscale_is_bit_exact(scaler):
    reference = _model_grads(None)
    scaled = _model_grads(scaler)
    for r, g in zip(reference, scaled):
        assert torch.equal(r, g)


def test_unscale_divides_in_place_once_per_parameter():
    p, q = _param(8.0, -24.0), nn.Parameter(torch.zeros(2))  # q has no grad
    grad = p.grad
    assert StaticLossScaler(8.0).unscale_([p, q, p]) is False
    assert p.grad is grad
    assert p.grad.tolist() == [1.0, -3.0]
    assert q.grad is None


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_grad_skips(bad):
    params = [_param(1.0, 2.0), _param(3.0, bad), _param(0.5)]
    assert StaticLossScaler(4.0).unscale_(params) is True


def test_finite_grads_do_not_skip_and_empty_grads_are_ignored():
    empty = nn.Parameter(torch.zeros(0))
    empty.grad = torch.zeros(0)
    assert StaticLossScaler().unscale_([_param(3.0e38, -1.0), empty]) is False


@pytest.mark.parametrize("grad_format", ["fp8_e5m2", parse("fp8_e5m2")])
def test_grad_format_max_bounds_the_unscaled_grads(grad_format):
    assert parse("fp8_e5m2").max == 57344.0
    # Compared after unscaling: 4 * 57344 unscales to exactly max, 4 * 57345 to above it.
    assert StaticLossScaler(4.0).unscale_([_param(4 * 57344.0, -1.0)], grad_format=grad_format) is False
    assert StaticLossScaler(4.0).unscale_([_param(1.0), _param(-4 * 57345.0)], grad_format=grad_format) is True
    assert StaticLossScaler().unscale_([_param(57344.0)], grad_format=grad_format) is False
    assert StaticLossScaler().unscale_([_param(57345.0)], grad_format=grad_format) is True


def test_block_grad_format_limit_is_element_max_times_2_pow_127():
    assert StaticLossScaler().unscale_([_param(3.0e38)], grad_format="mxfp8_e4m3") is False
    assert StaticLossScaler().unscale_([_param(float("inf"))], grad_format="mxfp8_e4m3") is True
    # mxint8's element max is 127/64, so its limit (~3.374e38) lies inside fp32's range.
    assert StaticLossScaler().unscale_([_param(3.38e38)], grad_format="mxint8") is True


def test_unscale_twice_without_update_errors():
    scaler = StaticLossScaler(2.0)
    p = _param(4.0)
    scaler.unscale_([p])
    with pytest.raises(ScalingError, match="update"):
        scaler.unscale_([p])
    assert p.grad.tolist() == [2.0]
    scaler.update(False)
    scaler.unscale_([p])
    assert p.grad.tolist() == [1.0]


def test_bad_grad_format_errors():
    with pytest.raises(MpcompileError):
        StaticLossScaler().unscale_([_param(1.0)], grad_format="fp7_nonsense")


def test_scale_multiplies_the_loss():
    loss = torch.tensor(0.75)
    assert DynamicLossScaler(init_scale=1024).scale(loss).item() == 768.0
    assert StaticLossScaler().scale(loss).item() == 0.75


def test_dynamic_schedule_with_clamps():
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3, min_scale=2.0, max_scale=32.0)
    script = "GGG GGG GGG S GGS S S S GG G".replace(" ", "")
    expected = [8, 8, 16,  16, 16, 32,  32, 32, 32,  16,  16, 16, 8,  4,  2,  2,  2, 2, 4]
    seen = []
    for step in script:
        scaler.update(step == "S")
        seen.append(scaler.scale_value)
    assert seen == expected
    assert scaler.steps == 19
    assert scaler.overflow_steps == 5
    assert scaler.growth_tracker == 0


def test_static_update_only_counts():
    scaler = StaticLossScaler(128.0)
    for skipped in (False, True, True, False):
        scaler.update(skipped)
    assert (scaler.scale_value, scaler.steps, scaler.overflow_steps) == (128.0, 4, 2)


def _train_step(scaler: LossScaler, weight: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """One step of a tiny Linear whose output gradient is rounded to fp8_e5m2 in backward."""
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    x = torch.tensor([[1.0, -2.0, 0.5], [0.25, 1.0, -1.0]])
    h = mpcompile.ops.quant(lin(x), None, grad_format="fp8_e5m2")
    loss = (h * torch.tensor([[4.0, -2.0], [1.0, 0.5]])).sum()
    return scaler.backward(loss, lin.parameters()), lin.weight.grad


def test_e5m2_gradient_overflow_backs_off_until_the_step_succeeds():
    weight = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
    _, reference = _train_step(StaticLossScaler(), weight)
    scaler = DynamicLossScaler(init_scale=2.0**16)
    outcomes = []
    while True:
        before = scaler.scale_value
        skipped, grad = _train_step(scaler, weight)
        outcomes.append((before, skipped))
        if skipped:
            assert not torch.isfinite(grad).all()
        else:
            break
    # The largest output gradient is 4 * scale: inf in E5M2 while 4 * scale > 57344 + half an ulp.
    assert outcomes == [(2.0**16, True), (2.0**15, True), (2.0**14, True), (2.0**13, False)]
    assert scaler.scale_value == 2.0**13
    assert scaler.overflow_steps == 3 and scaler.steps == 4
    assert torch.equal(grad, reference)


def _drive(scaler: LossScaler, script: str) -> list[float]:
    out = []
    for step in script:
        scaler.update(step == "S")
        out.append(scaler.scale_value)
    return out


def test_state_dict_round_trip_resumes_identically():
    original = DynamicLossScaler(init_scale=2.0**10, growth_interval=3, backoff_factor=0.25, max_scale=2.0**12)
    _drive(original, "GGSGG")
    state = original.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = DynamicLossScaler()  # different config: the state carries it
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.state_dict() == state
    assert resumed.config == original.config
    script = "GGGGGGSGGGGGG"
    assert _drive(resumed, script) == _drive(original, script)
    assert resumed.state_dict() == original.state_dict()
    assert (resumed.steps, resumed.overflow_steps, resumed.growth_tracker) == (18, 2, 0)

    static = StaticLossScaler(64.0)
    _drive(static, "GS")
    other = StaticLossScaler()
    other.load_state_dict(static.state_dict())
    assert (other.scale_value, other.steps, other.overflow_steps) == (64.0, 2, 1)


def test_load_state_of_the_wrong_kind_or_incomplete_errors():
    with pytest.raises(ScalingError, match="'dynamic' loss scaler"):
        StaticLossScaler().load_state_dict(DynamicLossScaler().state_dict())
    with pytest.raises(ScalingError, match="'static' loss scaler"):
        DynamicLossScaler().load_state_dict(StaticLossScaler().state_dict())
    state = DynamicLossScaler().state_dict()
    del state["growth_tracker"]
    with pytest.raises(ScalingError, match="growth_tracker"):
        DynamicLossScaler().load_state_dict(state)
    state = DynamicLossScaler().state_dict()
    state["config"]["growth_interval"] = 0
    with pytest.raises(ScalingError, match="growth_interval"):
        DynamicLossScaler().load_state_dict(state)


@pytest.mark.parametrize("make", [
    lambda: StaticLossScaler(0.0), lambda: StaticLossScaler(-2.0), lambda: StaticLossScaler(float("inf")),
    lambda: StaticLossScaler(float("nan")), lambda: StaticLossScaler(True),
    lambda: DynamicLossScaler(backoff_factor=1.0), lambda: DynamicLossScaler(growth_factor=0.5),
    lambda: DynamicLossScaler(growth_interval=0), lambda: DynamicLossScaler(growth_interval=2.0),
    lambda: DynamicLossScaler(init_scale=2.0**30), lambda: DynamicLossScaler(min_scale=0.0),
])
def test_bad_settings_error(make):
    with pytest.raises(ScalingError) as info:
        make()
    assert isinstance(info.value, ValueError) and isinstance(info.value, MpcompileError)


def test_make_loss_scaler_accepted_forms():
    none = make_loss_scaler(None)
    assert type(none) is StaticLossScaler and none.scale_value == 1.0
    assert make_loss_scaler(128).scale_value == 128.0
    assert type(make_loss_scaler(2.5)) is StaticLossScaler
    dynamic = make_loss_scaler("dynamic")
    assert type(dynamic) is DynamicLossScaler and dynamic.config == DynamicScalingConfig()
    assert dynamic.scale_value == 2.0**16
    custom = make_loss_scaler({"dynamic": True, "init_scale": 1024, "growth_interval": 100})
    assert custom.config == DynamicScalingConfig(init_scale=1024.0, growth_interval=100)
    assert custom.scale_value == 1024.0
    static = make_loss_scaler({"static": 128})
    assert type(static) is StaticLossScaler and static.scale_value == 128.0
    off = make_loss_scaler({"dynamic": False, "scale": 8})
    assert type(off) is StaticLossScaler and off.scale_value == 8.0
    assert make_loss_scaler(static) is static


@pytest.mark.parametrize("spec", [
    "fancy", True, [1], -1, 0, {}, {"static": 1, "dynamic": True}, {"dynamic": True, "bogus": 1},
    {"static": 4, "growth_interval": 3}, {"dynamic": "yes"}, {"dynamic": False, "init_scale": 2},
])
def test_make_loss_scaler_errors(spec):
    with pytest.raises(ScalingError) as info:
        make_loss_scaler(spec)
    message = str(info.value)
    assert "accepted" in message or "allowed" in message or "must" in message


def test_make_loss_scaler_error_lists_the_accepted_forms():
    with pytest.raises(ScalingError, match=r"None \(no scaling\).*'dynamic'.*\{'static'"):
        make_loss_scaler("fancy")
