"""Weights kept as codes of their master format between steps (``optimizer: {master, storage:
packed}``): bit-identical training, freed storages, reads through the module, checkpoints that
hold the codes, and the readers that are not a forward (monitor, memory report, SWALP)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import mpcompile
from mpcompile.errors import MpcompileError
from mpcompile.formats import parse
from mpcompile.models import build_model
from mpcompile.policy import OptimizerSettings
from mpcompile.runtime.optim import LowPrecisionOptimizer, make_optimizer, unpack_parameters
from mpcompile.runtime.trainer import TrainConfig, Trainer

MASTER = {"fp8_e5m2": 1, "fixed(8,6)": 1, "bf16": 2, "mxfp8_e4m3": None}  # bytes an element


def _settings(master: str, storage: str) -> OptimizerSettings:
    return OptimizerSettings(kind="sgd", master=parse(master), momentum=parse("bf16"), storage=storage,
                             update_rounding="stochastic")


def _step(model, optimizer, x, y) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize("master", sorted(MASTER))
def test_packed_weights_train_bit_for_bit_as_emulated_ones_in_their_codes_bytes(master):
    torch.manual_seed(0)
    emulated = build_model("lenet5")
    packed = copy.deepcopy(emulated)
    opt_e = LowPrecisionOptimizer(torch.optim.SGD(emulated.parameters(), lr=0.1, momentum=0.9),
                                  _settings(master, "emulated"))
    opt_p = LowPrecisionOptimizer(torch.optim.SGD(packed.parameters(), lr=0.1, momentum=0.9),
                                  _settings(master, "packed"), module=packed)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(3):
        _step(emulated, opt_e, x, y)
        _step(packed, opt_p, x, y)
        assert all(p.untyped_storage().nbytes() == 0 for p in packed.parameters())  # freed between steps
        if master.startswith("mx"):  # blocks of 32 along the last dim, padded, and a scale byte each
            expected = sum(-(-p.shape[-1] // 32) * (p.numel() // p.shape[-1]) * 33 for p in packed.parameters())
        else:
            expected = sum(p.numel() for p in packed.parameters()) * MASTER[master]
        assert opt_p.weight_bytes == expected
        for a, b in zip(emulated.state_dict().values(), packed.state_dict().values()):  # state_dict decodes
            assert torch.equal(a, b)
    assert torch.equal(emulated(x), packed(x))


def test_load_state_dict_and_optimizer_checkpoint_restore_the_weights_from_their_codes():
    torch.manual_seed(1)
    model = build_model("logreg")
    opt = LowPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), _settings("fp8_e5m2", "packed"),
                                module=model)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    _step(model, opt, x, y)
    saved = opt.state_dict()
    assert {i: c.dtype for i, (c, _) in saved["weights"].items()} == {0: torch.uint8, 1: torch.uint8}
    expected = copy.deepcopy(model.state_dict())  # the hook decodes them for state_dict
    fresh = build_model("logreg")
    fresh_opt = LowPrecisionOptimizer(torch.optim.SGD(fresh.parameters(), lr=0.5), _settings("fp8_e5m2", "packed"),
                                      module=fresh)
    fresh_opt.load_state_dict(saved)
    for a, b in zip(expected.values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    _step(model, opt, x, y)
    _step(fresh, fresh_opt, x, y)
    unpack_parameters(model), unpack_parameters(fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    model.load_state_dict(expected)  # into freed storages: the load hook decodes first
    assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())


def test_reading_a_packed_weight_outside_the_hooks_raises_instead_of_reading_freed_memory():
    torch.manual_seed(2)
    model = build_model("logreg")
    opt = LowPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), _settings("fp8_e5m2", "packed"),
                                module=model)
    _step(model, opt, torch.randn(8, 64), torch.randint(0, 10, (8,)))
    weight = model[1].weight
    for read in (weight.sum, lambda: copy.deepcopy(model), lambda: weight.detach().numpy()):
        with pytest.raises(RuntimeError, match=r"1\.weight is held as codes of fp8_e5m2 .*unpack_parameters"):
            read()
    unpack_parameters(model)
    assert torch.equal(weight.detach().clone(), model.state_dict()["1.weight"])  # readable again, and the same


def test_packed_weights_need_the_module_and_a_packable_storage():
    model = build_model("logreg")
    with pytest.raises(MpcompileError, match="pass module="):
        LowPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), _settings("bf16", "packed"))
    model[1].weight = torch.nn.Parameter(torch.randn(64, 10).t())  # a transposed view: not contiguous
    with pytest.raises(MpcompileError, match="1.weight shares its storage or is not contiguous"):
        LowPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), _settings("bf16", "packed"), module=model)


PACKED = ("version: 1\ndefault: {input: bf16, weight: bf16}\n"
          "optimizer: {kind: swalp, master: 'fixed(8,6)', momentum: bf16, storage: packed, update_rounding: stochastic,"
          " swa_start: 0 epochs, swa_every: 5 steps}\n")


def test_trainer_resumes_packed_weights_from_a_checkpoint_without_fp32_weights(tmp_path):
    config = lambda name, epochs, **kw: TrainConfig(model="logreg", data="digits", policy=PACKED, epochs=epochs,  # noqa: E731
                                                    batch_size=128, lr=0.2, schedule="constant",
                                                    out=str(tmp_path / name), **kw)
    straight = Trainer(config("straight", 2, monitor=4), progress=False)
    summary = straight.fit()
    Trainer(config("split", 1, monitor=4), progress=False).fit()
    checkpoint = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert not {"1.weight", "1.bias"} & checkpoint["model"].keys()
    assert checkpoint["optimizer"]["optimizer"]["weights"][0][0].dtype == torch.uint8
    resumed = Trainer.resume(tmp_path / "split", epochs=2, progress=False)
    resumed.fit()
    assert summary["test_accuracy"] > 0.8 and summary["swa_test_accuracy"] > 0.8
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    rows = [json.loads(line) for line in (tmp_path / "straight" / "monitor.jsonl").read_text().splitlines()]
    master = [r for r in rows if r["role"] == "master"]
    assert master and all(0 <= r["stagnation"] <= 1 for r in master)  # read from the weights the step left
    updates = [r for r in rows if r["role"] == "update"]
    assert updates and all(round(r["zero"] * r["count"]) + sum(r["hist"]) == r["count"] for r in updates)


def test_memory_report_holds_the_master_weights_as_codes():
    torch.manual_seed(0)
    policy = ("version: 1\ndefault: {input: bf16, weight: bf16}\n"
              "optimizer: {kind: sgd, master: fp8_e4m3, storage: packed}\n")
    cm = mpcompile.compile(build_model("lenet5"), policy, (torch.randn(2, 1, 8, 8),))
    report = mpcompile.memory_report(cm, 4)
    rows = {r.category: r for r in report.rows}
    numel = sum(p.numel() for p in cm.parameters())
    assert rows["master_weights"].held == numel  # a byte a weight, after the step
    assert rows["parameters"].held == 4 * numel  # fp32 from the forward to the step
    optimizer = make_optimizer("sgd", cm.parameters(), 0.1, cm.policy.optimizer, module=cm)
    _step(cm, optimizer, torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    again = {r.category: r.held for r in mpcompile.memory_report(cm, 4).rows}  # a packed model is read first
    assert again == {c: r.held for c, r in rows.items()}


def test_the_trust_region_refuses_packed_storage(tmp_path):
    policy = ("version: 1\ndefault: {input: bf16}\nlevels: [{name: bf16}, {name: fp32, keep: fp32}]\n"
              "trust_region: {delta0: 0.1}\noptimizer: {master: bf16, storage: packed}\n")
    with pytest.raises(MpcompileError, match="keeps no packed storage"):
        Trainer(TrainConfig(model="logreg", data="digits", policy=policy, out=str(tmp_path)), progress=False)
