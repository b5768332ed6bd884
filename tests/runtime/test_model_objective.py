"""The trust-region controller on compiled models: recompiles in place, per-layer raising, the trainer."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpcompile
from mpcompile.errors import MpcompileError
from mpcompile.policy import TrustRegionSettings, load_policy
from mpcompile.runtime.model_objective import ModelObjective
from mpcompile.runtime.scaling import make_loss_scaler
from mpcompile.runtime.trainer import TrainConfig, Trainer
from mpcompile.runtime.trust_region import TrustRegion

LADDER = """
version: 1
name: ladder
default: {input: e4m3, weight: e4m3, grad_output: e5m2}
levels:
  - {name: low}
  - {name: bf16, set: {input: bf16, weight: bf16, grad_output: bf16}}
  - {name: fp32, keep: fp32}
trust_region: {checks_per_epoch: 2, momentum: 0.5%s}
"""


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def data(n: int = 8):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 16, generator=gen), torch.randint(0, 4, (16,), generator=gen)) for _ in range(n)]


def controller(level=0, extra=""):
    model = mlp()
    policy = load_policy(LADDER % extra)
    cm = mpcompile.compile(model, policy, (torch.randn(2, 16),), level=level)
    obj = ModelObjective(cm, model, F.cross_entropy, make_loss_scaler(None), policy.trust_region)
    return model, cm, obj, TrustRegion(obj, policy.trust_region, steps_per_epoch=4)


def test_recompile_mid_run_continues_like_a_run_started_at_that_level():
    batches = data()
    model_a, cm_a, obj_a, tr_a = controller()
    for b in batches[:3]:
        tr_a.step(b)
    saved = ({k: v.clone() for k, v in model_a.state_dict().items()}, tr_a.state_dict())
    assert obj_a.raise_precision() and cm_a.level == 1  # in place: the same parameters, the same controller
    for b in batches[3:]:
        tr_a.step(b)

    model_b, cm_b, obj_b, tr_b = controller(level=1)
    model_b.load_state_dict(saved[0])
    tr_b.load_state_dict(saved[1])
    for b in batches[3:]:
        tr_b.step(b)
    assert tr_a.momentum is not None
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert tr_a.delta == tr_b.delta and all(torch.equal(m, n) for m, n in zip(tr_a.momentum, tr_b.momentum))


def test_per_layer_raises_the_op_with_the_largest_kappa_times_u():
    model = mlp()
    policy = load_policy(LADDER % ", per_layer: true, epsilon: bound")
    cm = mpcompile.compile(model, policy, (torch.randn(2, 16),), calibration=[torch.randn(64, 16)])
    obj = ModelObjective(cm, model, F.cross_entropy, make_loss_scaler(None), policy.trust_region)
    terms = cm.error_terms()
    assert set(terms) == {"_0", "_2", "_4"} and all(k is not None for k, _ in terms.values())
    shares = {op: k * u for op, (k, u) in terms.items()}
    worst = max(shares, key=shares.get)
    before = cm.assignments()
    assert obj.raise_precision()
    after = cm.assignments()
    assert cm.level == {"_0": 0, "_2": 0, "_4": 0, worst: 1}
    assert [op for op in before if before[op] != after[op]] == [worst]
    assert dict(after[worst].roles)["input"].quant.fmt == load_policy("bf16").default.roles[0][1].quant.fmt
    # eps bound: |f| * sum kappa * u over the ops, at the new levels
    x, y = data(1)[0]
    f = obj.loss((x, y))
    obj._last_loss = f
    expected = abs(f) * sum(k * u for k, u in cm.error_terms().values())
    assert obj.error((x, y)) == pytest.approx(expected, rel=1e-12)
    assert obj.lower_precision() and cm.level == {"_0": 0, "_2": 0, "_4": 0}


def test_measured_error_is_the_gap_to_fp32():
    model, cm, obj, _ = controller()
    x, y = data(1)[0]
    with torch.no_grad():
        expected = abs(float(F.cross_entropy(cm(x), y)) - float(F.cross_entropy(model(x), y)))
    assert obj.error((x, y)) == expected > 0
    obj.raise_precision(), obj.raise_precision()
    assert obj.error((x, y)) == 0.0 and not obj.raise_precision()  # fp32 is the top


def test_optimizer_state_formats_are_refused():
    model = mlp()
    policy = load_policy(LADDER % "" + "optimizer: {momentum: bf16}\n")
    cm = mpcompile.compile(model, policy)
    with pytest.raises(MpcompileError, match="drop them"):
        ModelObjective(cm, model, F.cross_entropy, make_loss_scaler(None), policy.trust_region, policy.optimizer)


def test_trainer_runs_the_controller_and_resumes_bit_identically(tmp_path):
    # coarse e3m2 operands and short steps: eps soon exceeds eta1 * pred / 2 and the ladder is climbed
    policy = (LADDER % ", delta0: 0.05, delta_max: 0.05").replace("checks_per_epoch: 2", "checks_per_epoch: 50")
    policy = policy.replace("{input: e4m3, weight: e4m3, grad_output: e5m2}", "{input: e3m2, weight: e3m2}")
    config = dict(model="mlp", data="digits", policy=policy, batch_size=128)
    full = Trainer(TrainConfig(**config, epochs=2, out=str(tmp_path / "full")), progress=False)
    summary = full.fit()
    assert summary["recompiles"] >= 1 and sum(summary["levels"].values()) == 2 * 11  # 1347 images / 128
    assert set(summary["levels"]) <= {"low", "bf16", "fp32"} and summary["checks"] > 0
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    checks = [m for m in lines if "check" in m]
    assert any(c["raised"] for c in checks)
    assert {"level", "delta", "rho", "eps", "pred", "accepted"} <= set(checks[0])
    assert (tmp_path / "full" / "trust_region.png").stat().st_size > 0

    Trainer(TrainConfig(**config, epochs=1, out=str(tmp_path / "half")), progress=False).fit()
    resumed = Trainer.resume(tmp_path / "half", epochs=2, progress=False)
    again = resumed.fit()
    for a, b in zip(full.compiled.state_dict().values(), resumed.compiled.state_dict().values()):
        assert torch.equal(a, b)
    for key in ("levels", "recompiles", "checks", "final_delta", "test_accuracy", "train_loss"):
        assert again[key] == summary[key], key


@pytest.mark.slow
def test_resnet20_trains_through_the_controller_on_fake_data(tmp_path):
    policy = """
version: 1
name: bf16_ladder
default: {input: bf16, weight: bf16}
levels: [{name: bf16}, {name: fp32, keep: fp32}]
trust_region: {checks_per_epoch: 4, epsilon: measured}
"""
    summary = mpcompile.train(model="resnet20", data="fake", policy=policy, epochs=1, batch_size=64,
                              out=str(tmp_path), progress=False)
    assert sum(summary["levels"].values()) == 4 and summary["checks"] == 4
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert TrustRegionSettings().eta1 == 0.25


@pytest.mark.parametrize("per_layer", [False, True])
def test_error_lower_probes_the_level_below_and_comes_back(per_layer):
    extra = ", per_layer: true" if per_layer else ""
    model, cm, obj, _ = controller(extra=extra)
    batch = data(1)[0]
    at_bottom = obj.error(batch)
    assert obj.error_lower(batch) is None  # nothing below level 0
    obj.raise_precision()
    level, assignments = cm.level, cm.assignments()
    assert obj.error_lower(batch) == at_bottom  # measured at the level below ...
    assert cm.level == level and cm.assignments() == assignments  # ... and back where it was
    assert obj.recompiles == 3
