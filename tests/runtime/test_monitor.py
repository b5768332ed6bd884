"""Monitoring while training: a monitored run equals an unmonitored one bit for bit, the rows
hold what the formats did (checked against hand counts), TensorBoard's reader finds every
op/role, and what cannot be monitored is refused."""
from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mpcompile.errors import MpcompileError
from mpcompile.formats import parse
from mpcompile.rounding import quantize
from mpcompile.policy import MonitorSettings, OptimizerSettings
from mpcompile.runtime.monitor import Monitor, number_stats
from mpcompile.runtime.optim import LowPrecisionOptimizer
from mpcompile.runtime.trainer import TrainConfig, Trainer

# stochastic GEMM operands and a low-precision master and momentum: every kind of rounding the
# monitor observes, and random bits that a monitored step must not disturb
POLICY = """version: 1
default: {input: fp8_e4m3:stochastic, weight: fp8_e4m3, output: bf16, grad_output: fp8_e5m2:stochastic}
optimizer: {master: 'fixed(16,12)', momentum: bf16, update_rounding: stochastic}
monitor: {every: 4}
"""


def _config(tmp_path, name: str, policy: str = POLICY, **kwargs) -> TrainConfig:
    return TrainConfig(**{"model": "lenet5", "data": "digits", "policy": policy, "epochs": 1, "batch_size": 128,
                          "out": str(tmp_path / name), **kwargs})


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "monitor.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitor")
    trainer = Trainer(_config(tmp, "monitored", epochs=2), progress=False)
    trainer.fit()
    return trainer, tmp / "monitored"


def test_a_monitored_run_trains_exactly_as_an_unmonitored_one(monitored, tmp_path):
    trainer, _ = monitored
    plain = Trainer(_config(tmp_path, "plain", POLICY.replace("monitor: {every: 4}\n", ""), epochs=2), progress=False)
    plain.fit()
    for (name, a), b in zip(trainer.compiled.named_parameters(), plain.compiled.parameters()):
        assert torch.equal(a, b), name
    assert not (tmp_path / "plain" / "monitor.jsonl").exists()
    memory = json.loads((monitored[1] / "memory.json").read_text())  # the report's memory table, measured on a copy
    assert set(memory["categories"]) == {"parameters", "master_weights", "gradients", "optimizer_states", "activations"}


def test_every_monitored_step_has_every_role_of_every_quantized_op(monitored):
    trainer, run = monitored
    rows = _rows(run)
    steps = sorted({r["step"] for r in rows})
    assert steps == [0, 4, 8, 12, 16, 20]  # 11 steps of 128 in an epoch of digits, counted over the run
    assert {r["step"]: r["epoch"] for r in rows} == {0: 1, 4: 1, 8: 1, 12: 2, 16: 2, 20: 2}
    ops = {r["op"] for r in rows if r["role"] == "input"}
    assert ops == {"features_3", "classifier_1", "classifier_3", "classifier_5", "features_0"}
    params = [name for name, _ in trainer.compiled.named_parameters()]
    for step in steps:
        have = {(r["op"], r["role"]) for r in rows if r["step"] == step}
        for op in ops:
            assert {(op, role) for role in ("input", "weight", "output", "grad_output")} <= have
        for name in params:
            assert {(name, "master"), (name, "update")} <= have
            assert (name, "momentum") in have or step == 0  # SGD's momentum buffer exists from the first step
    first = next(r for r in rows if r["op"] == "classifier_1" and r["role"] == "input" and r["step"] == 0)
    e4m3 = parse("fp8_e4m3")
    assert (first["format"], first["max"], first["min_normal"]) == ("fp8_e4m3", e4m3.max, e4m3.min_normal)
    in_features = trainer.compiled.get_submodule("classifier.1").in_features
    assert first["count"] == 128 * in_features and sum(first["hist"]) + first["zero"] * first["count"] == pytest.approx(first["count"])
    assert 20 < first["sqnr_db"] < 40  # e4m3 keeps 3 bits: about 6 dB a bit, plus the distribution's share


def test_stagnation_counts_updates_below_half_a_ulp_of_the_stored_weight(tmp_path):
    model = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    model.weight.grad = torch.tensor([[0.01, 0.02, 0.04, 0.0]])
    settings = OptimizerSettings(master=parse("fixed(8,4)"))  # a spacing of 1/16 at 1.0; nearest rounding
    optimizer = LowPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), settings)
    monitor = Monitor(model, MonitorSettings(every=1), tmp_path)
    with monitor.step(0, 1):
        optimizer.step()
    monitor.close()
    rows = {r["role"]: r for r in _rows(tmp_path)}
    # updates -0.01, -0.02, -0.04 and 0: the first two are below half a spacing (1/32)
    assert rows["master"]["stagnation"] == pytest.approx(2 / 3)
    assert model.weight.tolist() == [[1.0, 1.0, 0.9375, 1.0]]
    assert rows["update"]["stagnation"] == pytest.approx(2 / 3)  # the weights that did not move
    assert rows["update"]["count"] == 4 and rows["update"]["zero"] == 0.75


def test_tensorboard_reader_finds_every_op_and_role(monitored):
    _, run = monitored
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars, histograms = set(events.Tags()["scalars"]), set(events.Tags()["histograms"])
    for row in _rows(run):
        tag = f"{row['op']}/{row['role']}"
        assert f"{tag}/overflow" in scalars and f"{tag}/underflow" in scalars
        if row["hist"]:
            assert f"{tag}/log2_abs" in histograms
    steps = [e.step for e in events.Scalars("classifier_1/input/underflow")]
    assert steps == [0, 4, 8, 12, 16, 20]


def test_number_stats_match_a_hand_count():
    fmt = parse("fp8_e4m3")  # max 448, smallest normal 2**-6, smallest subnormal 2**-9
    x = torch.tensor([0.0, 1000.0, -500.0, 2.0**-12, 2.0**-8, 3.0, -0.75, 2.0**-6])
    q = quantize(x, fmt, saturate=True)
    stats = number_stats(x, q, fmt)
    n = len(x)
    assert stats["zero"] == 1 / n
    assert stats["overflow"] == 2 / n  # 1000 and -500 beyond 448
    assert stats["underflow"] == 1 / n  # 2**-12 below half the smallest subnormal
    assert stats["subnormal"] == 1 / n  # 2**-8 is subnormal; 2**-6 is the smallest normal
    # floor(log2|x|) of the nonzero values: 9, 8, -12, -8, 1, -1, -6
    assert stats["hist_lo"] == -12
    assert stats["hist"] == [1 if e in (9, 8, -12, -8, 1, -1, -6) else 0 for e in range(-12, 10)]
    noise = ((q.double() - x.double()) ** 2).sum()
    assert stats["sqnr_db"] == pytest.approx(10 * math.log10(float((x.double() ** 2).sum() / noise)))
    exact = number_stats(q, q, fmt)
    assert exact["sqnr_db"] == math.inf and exact["overflow"] == 0


def test_selected_ops_and_roles_only(tmp_path):
    policy = POLICY.replace("monitor: {every: 4}", "monitor: {every: 8, ops: {type: Linear}, roles: [grad_output], "
                                                   "histograms: false}")
    Trainer(_config(tmp_path, "some", policy), progress=False).fit()
    rows = _rows(tmp_path / "some")
    assert {(r["op"], r["role"]) for r in rows} == {(op, "grad_output") for op in ("classifier_1", "classifier_3",
                                                                                    "classifier_5")}
    assert all(r["hist"] == [] for r in rows)


def test_monitor_refuses_what_it_cannot_record(tmp_path):
    with pytest.raises(MpcompileError, match="positive number of steps"):
        Trainer(_config(tmp_path, "zero", monitor=0), progress=False)
    halp = "version: 1\noptimizer: {kind: halp, mu: 1}\n"
    with pytest.raises(MpcompileError, match="halp takes its steps itself"):
        Trainer(_config(tmp_path, "halp", halp, monitor=5), progress=False)


def test_quantized_roles_it_cannot_attribute_are_named(tmp_path):
    policy = POLICY + "rules:\n  - {match: {type: activation}, output: bf16}\n"
    with pytest.warns(UserWarning, match=r"features\.1.*are not recorded"):
        Trainer(_config(tmp_path, "act", policy, epochs=0), progress=False).fit()


def test_a_kappa_selector_calibrates_and_selects_by_the_condition_number(tmp_path):
    # every GEMM's kappa is at least 1, so kappa_above: 1 keeps only ops the condition pass measured
    policy = POLICY.replace("monitor: {every: 4}", "monitor: {every: 8, ops: {kappa_above: 1}, roles: [input]}")
    trainer = Trainer(_config(tmp_path, "kappa", policy), progress=False)
    trainer.fit()
    measured = {meta.name for _, meta in trainer.compiled.annotations()
                if meta.kappa is not None and meta.kappa.p99 > 1}
    rows = _rows(tmp_path / "kappa")
    assert measured and {r["module"] for r in rows} == measured
