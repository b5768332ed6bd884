"""The trainer calibrates where the policy reads kappa (or statistics are asked for): on the
first training batches, again at each recompile that changes formats, and a checkpoint keeps
the estimates kappa rules selected with; warnings are printed once."""
from __future__ import annotations

import torch

from mpcompile.cli import main
from mpcompile.runtime.trainer import TrainConfig, Trainer

KAPPA = """version: 1
default: {input: bf16, weight: bf16}
rules:
  - match: {kappa_above: KAPPA}
    input: fp8_e4m3
    weight: fp8_e4m3
"""


def _config(tmp_path, policy: str, **kwargs) -> TrainConfig:
    return TrainConfig(**{"model": "mlp", "data": "digits", "policy": policy, "epochs": 1, "batch_size": 128,
                          "lr": 0.1, "out": str(tmp_path / "run"), **kwargs})


def _kappa(trainer: Trainer) -> dict[str, float]:
    """The GEMMs' estimates (a ReLU's kappa_phi is 1 wherever it is defined)."""
    gemms = {node.name for node, meta in trainer.compiled.annotations() if meta.group == "gemm"}
    return {name: k.p99 for name, k in trainer.compiled.condition_estimates().items() if name in gemms}


def test_kappa_rules_match_under_train(tmp_path):
    plain = Trainer(_config(tmp_path, KAPPA.replace("KAPPA", "1")), progress=False)
    kappa = _kappa(plain)
    assert plain.compiled.calibrated and len(kappa) == 3 and min(kappa.values()) > 1
    # the estimates are of the first training batches, not of the 8-sample example input
    first = [plain.data.batch("train", torch.arange(i, i + 128))[0] for i in (0, 128)]
    two = Trainer(_config(tmp_path, KAPPA.replace("KAPPA", "1"), calibration_batches=2), progress=False)
    assert len(two.compiled._state.batches) == 2 and torch.equal(two.compiled._state.batches[1][0], first[1])
    bound = sorted(kappa.values())[1]  # above the two smaller estimates: the largest alone
    picked = Trainer(_config(tmp_path, KAPPA.replace("KAPPA", f"{bound:.6g}")), progress=False)
    fp8 = [n for n, a in picked.compiled.assignments().items() if str(dict(a.roles)["input"].quant) == "fp8_e4m3"]
    assert fp8 == [max(kappa, key=kappa.get)]
    table = picked.compiled.table()
    assert f"{kappa[fp8[0]]:.3g}" in table


def test_no_calibration_where_nothing_reads_it_and_stats_asks_for_it(tmp_path):
    policy = "version: 1\ndefault: {input: bf16, weight: bf16}\n"
    assert not Trainer(_config(tmp_path, policy), progress=False).compiled.calibrated
    measured = Trainer(_config(tmp_path, policy, stats=True), progress=False)
    assert measured.compiled.calibrated and measured.compiled.stats_current


def test_a_recompile_that_changes_formats_measures_kappa_again(tmp_path):
    policy = KAPPA.replace("KAPPA", "1") + "levels:\n  - {name: low}\n  - {name: bf16, set: {input: bf16, weight: bf16}}\n"
    trainer = Trainer(_config(tmp_path, policy), progress=False)
    before = _kappa(trainer)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.mul_(2.0).add_(torch.randn_like(p))
    trainer.compiled.recompile(level=0)  # nothing changes: nothing is measured
    assert _kappa(trainer) == before
    trainer.compiled.recompile(level=1)
    after = _kappa(trainer)
    assert after.keys() == before.keys() and after != before
    trainer.compiled.load_condition_estimates(trainer.compiled.condition_estimates())
    assert _kappa(trainer) == after


def test_resume_keeps_the_kappa_rules_selected_with(tmp_path):
    policy = KAPPA.replace("KAPPA", "1") + "levels:\n  - {name: low}\n  - {name: bf16, set: {input: bf16, weight: bf16}}\n"
    trainer = Trainer(_config(tmp_path, policy), progress=False)
    start = _kappa(trainer)
    trainer.fit()
    trainer.compiled.recompile(level=1)  # measured again, with the trained parameters
    trainer.save()
    assert _kappa(trainer) != start
    resumed = Trainer.resume(tmp_path / "run", epochs=2, progress=False)
    assert _kappa(resumed) == _kappa(trainer)
    assert resumed.compiled.assignments() == trainer.compiled.assignments()
    assert "kappa p99" in (tmp_path / "run" / "table.txt").read_text()


def test_cli_prints_each_warning_once(tmp_path, capsys):
    policy = tmp_path / "idle.yaml"
    policy.write_text("version: 1\ndefault: {input: bf16}\nrules:\n  - match: {type: Conv2d}\n    input: fp16\n"
                      "  - match: {type: ReLU}\n    keep: fp32\n")
    assert main(["train", "--model", "mlp", "--epochs", "1", "--policy", str(policy),
                 "--out", str(tmp_path / "cli")]) == 0
    err = capsys.readouterr().err
    assert err.count("rules[0]") == 1 and "matches no op of this model" in err
    assert err.count("rules[1]") == 1 and "keep: fp32 on ops that are fp32 anyway" in err
