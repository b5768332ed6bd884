"""The trainer with each optimizer kind a policy names: bit-identical resume of the new state
(anchor, full gradient, offsets and scale; the SWA average), and the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mpcompile.cli import main
from mpcompile.errors import MpcompileError
from mpcompile.runtime.optim import HALP, SWALP
from mpcompile.runtime.trainer import TrainConfig, Trainer

# HALP whose inner and full gradients come from the compiled model's formats (stochastic
# gradients, so resume must replay the loss scaler and both generators)
HALP_LOW_PRECISION = """version: 1
default: {input: bf16, weight: bf16, grad_output: fp8_e5m2:stochastic}
optimizer: {kind: halp, mu: 1, bits: 8, T: 5 steps, update_rounding: stochastic}
"""
POLICIES = {
    "halp": HALP_LOW_PRECISION,
    "lpsvrg": "version: 1\noptimizer: {kind: lpsvrg, master: 'fixed(8,5)', T: 1 epoch, update_rounding: stochastic}\n",
    "svrg": "version: 1\noptimizer: {kind: svrg, T: 7 steps}\n",
    "swalp": "version: 1\noptimizer: {kind: swalp, master: 'fixed(8,6)', update_rounding: stochastic, "
             "swa_start: 0 epochs, swa_every: 3 steps}\n",
}


def _config(tmp_path, kind: str, name: str, **kwargs) -> TrainConfig:
    return TrainConfig(**{"model": "logreg", "data": "digits", "policy": POLICIES[kind], "epochs": 2,
                          "batch_size": 128, "lr": 0.2, "schedule": "constant", "out": str(tmp_path / name),
                          **kwargs})


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_two_epochs_equal_one_then_resume_then_one(tmp_path, kind):
    straight = Trainer(_config(tmp_path, kind, "straight"), progress=False)
    summary = straight.fit()
    Trainer(_config(tmp_path, kind, "split", epochs=1), progress=False).fit()
    resumed = Trainer.resume(tmp_path / "split", epochs=2, progress=False)
    resumed.fit()
    assert summary["optimizer"] == kind and summary["test_accuracy"] > 0.8
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    if isinstance(straight.optimizer, HALP):
        p, q = (next(iter(t.optimizer.state.values())) for t in (straight, resumed))
        assert torch.equal(p["codes"], q["codes"]) and torch.equal(p["scale"], q["scale"])
        assert straight.scaler.scale_value == resumed.scaler.scale_value
    if isinstance(straight.optimizer, SWALP):
        assert all(torch.equal(a, b) for a, b in zip(straight.optimizer.average, resumed.optimizer.average))
        steps = 2 * math.ceil(straight.data.size("train") / 128)
        assert summary["swa_averaged"] == steps // 3 and 0.8 < summary["swa_test_accuracy"] <= 1
        assert straight.history[-1]["swa_test_accuracy"] == resumed.history[-1]["swa_test_accuracy"]


def test_a_kind_the_policy_contradicts_or_the_trust_region_would_ignore_is_refused(tmp_path):
    with pytest.raises(MpcompileError, match="is for kind halp, but adam was asked for"):
        Trainer(_config(tmp_path, "halp", "x", optimizer="adam"))
    with pytest.raises(MpcompileError, match="optimizer halp would not be used"):
        Trainer(_config(tmp_path, "halp", "x", policy="trust_region", optimizer="halp"))


def test_cli_trains_with_a_shipped_halp_policy(tmp_path, capsys):
    out = tmp_path / "halp"
    assert main(["train", "--policy", "halp8", "--model", "logreg", "--epochs", "1", "--lr", "0.3",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer"] == "halp" and summary["test_accuracy"] > 0.8
    assert main(["train", "--policy", "halp8", "--optimizer", "sgd", "--out", str(tmp_path / "x")]) == 2
    assert "is for kind halp, but sgd was asked for" in capsys.readouterr().err
    assert main(["check", "halp8"]) == 0
    assert "  optimizer: kind=halp, update_rounding=stochastic, mu=1.0, T=1 epoch, bits=8" in capsys.readouterr().out


def test_an_overflowing_gradient_or_a_nan_loss_abandons_a_variance_reduced_step(tmp_path, monkeypatch):
    trainer = Trainer(_config(tmp_path, "halp", "skip"), progress=False)
    x, y = trainer.data.batch("train", torch.arange(128))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    answers = iter([False, True])  # the full gradient is fine, the step's gradient at w overflows
    unscale = trainer.scaler.unscale_
    monkeypatch.setattr(trainer.scaler, "unscale_", lambda *a: (unscale(*a), next(answers))[1])
    loss, correct, skipped = trainer._train_step(x, y)
    assert skipped and correct == 0 and trainer.scaler.overflow_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before))
    assert trainer.optimizer.steps == 0
    monkeypatch.setattr(trainer.scaler, "unscale_", unscale)
    _, _, skipped = trainer._train_step(x.clone().fill_(float("nan")), y)
    assert skipped and trainer.nan_loss_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before))
