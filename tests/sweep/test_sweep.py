"""The precision sweep: every model natively in fp64 and fp16 and emulated, scikit-learn's
accuracies at fp64, resume, Ctrl-C, unsupported rows, the outputs and the CLI."""
from __future__ import annotations

import dataclasses
import json
import math
import struct

import matplotlib.image
import pytest
import torch
from torch import nn

import mpcompile
from mpcompile.cli import main
from mpcompile.errors import MpcompileError
from mpcompile.sweep.data import load_data
from mpcompile.formats import parse
from mpcompile.sweep.models import Network, sweep_model
from mpcompile.sweep.native import NativePlan, run_modes
from mpcompile.sweep.precision import resolve_precision
from mpcompile.sweep.results import findings, read_rows
from mpcompile.sweep.training import run_one

CPU = torch.device("cpu")
MODELS = ("linreg", "linreg_qr", "linreg_normal", "logreg", "svm", "tree", "mlp", "lenet5", "resnet20")


def _small(name: str):
    """The model for one epoch on its data's first 96 train examples (the test split whole)."""
    model = sweep_model(name, epochs=1)
    data = load_data(model.data)
    n = 96
    return model, dataclasses.replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n])


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_in_fp64_and_fp16_natively_and_emulated(name):
    model, data = _small(name)
    outcomes = {}
    for precision, mode in (("fp64", "native"), ("fp32", "native"), ("fp16", "native"), ("fp16", "emulated"),
                            ("e5m2", "emulated")):
        try:
            outcome = run_one(model, data, resolve_precision(precision), mode, 0, CPU)
        except torch.linalg.LinAlgError:  # A^T A is not positive definite with 2 mantissa bits
            assert (name, precision) == ("linreg_normal", "e5m2")
            continue
        assert outcome.train_seconds > 0 and outcome.epochs == (1 if isinstance(model.trainer, Network) else 0)
        outcomes[precision, mode] = outcome
    fp64, fp32 = outcomes["fp64", "native"], outcomes["fp32", "native"]
    native, emulated = outcomes["fp16", "native"], outcomes["fp16", "emulated"]
    if isinstance(model.trainer, Network):  # the same weights and batches in every run
        assert fp64.final_loss == pytest.approx(fp32.final_loss, rel=1e-5)
        # emulated fp16 rounds what native fp16 computes in: one step apart by little
        assert emulated.final_loss == pytest.approx(native.final_loss, rel=0.01)
        assert all(math.isfinite(o.final_loss) for o in outcomes.values())
    else:  # a solver's emulated fp16 is native fp16, bit for bit; fp64 is scikit-learn's model
        assert emulated.score == native.score and fp64.score == pytest.approx(model.reference(data), abs=0.03)


@pytest.mark.parametrize("name", ["logreg", "svm", "tree"])
def test_fp64_accuracy_is_within_2_points_of_scikit_learns_on_the_same_split(name):
    model = sweep_model(name)
    data = load_data(model.data)
    outcome = run_one(model, data, resolve_precision("fp64"), "native", 0, CPU)
    assert abs(outcome.score - model.reference(data)) <= 0.02


def qr_net(num_classes: int) -> nn.Module:
    """A network whose forward needs LAPACK's QR, which torch has no float16 CPU kernel for."""
    class QR(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, num_classes)

        def forward(self, x):
            h = x.flatten(1)
            return self.fc(h @ torch.linalg.qr(h.T @ h)[0])
    return QR()


def test_sweep_rows_resume_unsupported_and_outputs(tmp_path):
    out = tmp_path / "sweep"
    rows = mpcompile.sweep(["tree", "test_sweep:qr_net"], ["fp64", "fp16"], 2, out, epochs=1, progress=False)
    by = {(r["model"], r["precision"], r["mode"], r["seed"]): r for r in rows}
    assert len(rows) == 2 * (1 + 2) * 2  # fp64 native; fp16 native and emulated; 2 seeds
    qr_fp16 = by["test_sweep:qr_net", "fp16", "native", 0]
    assert qr_fp16["status"].startswith("unsupported:") and "not implemented for 'Half'" in qr_fp16["status"]
    assert by["test_sweep:qr_net", "fp64", "native", 1]["status"] == "ok"
    assert by["test_sweep:qr_net", "fp16", "emulated", 0]["status"] == "ok"  # emulated fp16 computes in fp32
    tree = by["tree", "fp64", "native", 0]
    assert tree["status"] == "ok" and tree["metric"] == "accuracy" and 0.9 < tree["score"] <= 1
    assert tree["reference"] == pytest.approx(json.loads((out / "results.json").read_text())["references"]["tree"])
    summary = json.loads((out / "results.json").read_text())
    assert summary["threads"] == torch.get_num_threads() and summary["torch"] == torch.__version__
    assert {f["model"] for f in summary["findings"]} == {"tree"}  # the QR net has no native fp16 score to compare
    table = (out / "results.md").read_text()
    assert "### tree on iris" in table and "unsupported: " in table and "| fp16 | emulated |" in table
    for png in ("score_vs_time.png", "bars_tree.png", "bars_test_sweep_qr_net.png"):
        image = matplotlib.image.imread(out / "plots" / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image[..., :3].std() > 0  # drawn, not blank
    with pytest.raises(MpcompileError, match="--resume"):
        mpcompile.sweep(["tree"], ["fp64"], 1, out, progress=False)
    again = mpcompile.sweep(["tree"], ["fp64", "bf16"], 2, out, resume=True, progress=False)
    assert len(again) == len(rows) + 2 * 2  # only bf16's native and emulated runs are new
    assert again[:len(rows)] == read_rows(out / "results.csv")[:len(rows)]


_CALLS = {"n": 0}


def interrupting_net(num_classes: int) -> nn.Module:
    """A network whose third build is interrupted, as Ctrl-C would."""
    _CALLS["n"] += 1
    if _CALLS["n"] == 3:
        raise KeyboardInterrupt
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))


def test_ctrl_c_keeps_the_finished_rows_and_resume_runs_the_rest(tmp_path, capsys):
    _CALLS["n"] = 0
    args = ["sweep", "--models", "test_sweep:interrupting_net", "--precisions", "fp32", "--seeds", "4", "--epochs", "1",
            "--out", str(tmp_path)]
    assert main(args) == 130
    assert "--resume" in capsys.readouterr().err
    assert [r["seed"] for r in read_rows(tmp_path / "results.csv")] == [0, 1]  # the third run was interrupted
    assert (tmp_path / "results.md").exists()
    assert main(args + ["--resume"]) == 0
    assert [r["seed"] for r in read_rows(tmp_path / "results.csv")] == [0, 1, 2, 3]


def test_findings_flag_a_gap_beyond_seed_noise():
    def rows(mode, scores):
        return [{"model": "m", "precision": "fp16", "mode": mode, "status": "ok", "metric": "accuracy", "score": s}
                for s in scores]
    close = findings(rows("native", [0.90, 0.92, 0.91]) + rows("emulated", [0.91, 0.90, 0.92]), {"m": 100})
    far = findings(rows("native", [0.90, 0.92, 0.91]) + rows("emulated", [0.80, 0.81, 0.79]), {"m": 100})
    assert [f["flagged"] for f in close] == [False] and [f["flagged"] for f in far] == [True]
    assert far[0]["gap"] == pytest.approx(-0.11)
    # identical seeds: one test example's worth of accuracy is the least gap that counts
    tie = findings(rows("native", [0.9] * 3) + rows("emulated", [0.9 - 1 / 200] * 3), {"m": 100})
    assert [f["flagged"] for f in tie] == [False]


def test_precisions_and_models_are_resolved_or_refused_by_name(capsys):
    fp16, hfp8 = resolve_precision("fp16"), resolve_precision("hfp8")
    assert run_modes(fp16, CPU) == ("native", "emulated") and fp16.dtype == torch.float16
    assert fp16.policy.optimizer.master == fp16.fmt  # emulated fp16 stores its weights in fp16, as native does
    assert run_modes(hfp8, CPU) == ("emulated",) and hfp8.fmt is None
    assert run_modes(resolve_precision("fp64"), CPU) == ("native",)
    assert run_modes(resolve_precision("fp8_e4m3"), CPU) == ("emulated",)  # fp8 GEMMs natively: CUDA, sm_89 on
    assert sweep_model("logreg@wine").data == "wine"
    with pytest.raises(MpcompileError, match="precision 'fp9'"):
        resolve_precision("fp9")
    with pytest.raises(MpcompileError, match="unknown sweep model 'lenet'"):
        sweep_model("lenet")
    assert main(["sweep", "--precisions", "fp9", "--out", "unused"]) == 2
    assert "precision 'fp9'" in capsys.readouterr().err


def test_a_factorisation_that_rounding_breaks_is_a_row_and_the_sweep_goes_on(tmp_path):
    rows = mpcompile.sweep(["linreg_normal", "tree"], ["e5m2"], 1, tmp_path, progress=False)
    status = {r["model"]: r["status"] for r in rows}
    assert status["linreg_normal"].startswith("numerical failure: least_squares(method='normal')")
    assert status["tree"] == "ok"
    again = mpcompile.sweep(["linreg_normal", "tree"], ["e5m2"], 1, tmp_path, resume=True, progress=False)
    assert again == rows  # a numerical failure is a result: resume does not run it again


def test_cli_reads_formats_with_commas_in_the_precision_list(tmp_path):
    assert main(["sweep", "--models", "tree", "--precisions", "fixed(8,4),fp64", "--seeds", "1",
                 "--out", str(tmp_path)]) == 0
    rows = read_rows(tmp_path / "results.csv")
    assert [(r["precision"], r["mode"], r["status"]) for r in rows] == [("fixed(8,4)", "emulated", "ok"),
                                                                          ("fp64", "native", "ok")]


def test_autocast_and_fp8_gemm_plans_train_here_as_on_a_gpu():
    model, data = _small("mlp")
    autocast = run_one(model, data, resolve_precision("bf16"), "native", 0, CPU, plan=NativePlan("autocast", torch.bfloat16))
    fp8 = run_one(model, data, resolve_precision("fp8_e4m3"), "native", 0, CPU,
                  plan=NativePlan("fp8", torch.bfloat16, torch.float8_e4m3fn))
    assert math.isfinite(autocast.final_loss) and math.isfinite(fp8.final_loss)
    assert autocast.notes == "native: torch.autocast(bfloat16)"
    assert fp8.notes.startswith("native: torch._scaled_mm in float8_e4m3fn")


def test_float8_linear_multiplies_the_amax_scaled_fp8_operands():
    torch.manual_seed(0)
    linear, x = nn.Linear(40, 24), torch.randn(5, 3, 40, requires_grad=True)
    expected_grad = torch.autograd.grad(linear(x).sum(), [x, linear.weight])
    module, _ = NativePlan("fp8", torch.bfloat16, torch.float8_e4m3fn).prepare(linear, x)
    out = module(x)

    def fp8(t):  # the operand on e4m3's grid after dividing by amax / 448, and that scale
        scale = t.detach().abs().amax() / 448
        return mpcompile.quantize(t.detach() / scale, parse("fp8_e4m3"), saturate=True), scale
    (xq, sx), (wq, sw) = fp8(x.reshape(-1, 40)), fp8(linear.weight)
    reference = (xq.double() @ wq.double().T) * float(sx) * float(sw) + linear.bias.detach().double()
    assert out.shape == (5, 3, 24)
    assert torch.allclose(out.double().reshape(-1, 24), reference, rtol=1e-5, atol=1e-6)
    # the backward reads the operands as they came: nn.Linear's own gradients
    for got, want in zip(torch.autograd.grad(out.sum(), [x, module.weight]), expected_grad):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_data_dir_with_fashion_mnist_or_cifar10_is_what_the_networks_train_on(tmp_path):
    import numpy as np

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = np.zeros((4, 28, 28), np.uint8), np.arange(4, dtype=np.uint8)
    for name, magic, array in (("train-images-idx3-ubyte", 2051, images), ("train-labels-idx1-ubyte", 2049, labels),
                               ("t10k-images-idx3-ubyte", 2051, images), ("t10k-labels-idx1-ubyte", 2049, labels)):
        (raw / name).write_bytes(struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes())
    assert sweep_model("mlp", data_dir=tmp_path).data == "fashion_mnist"
    assert sweep_model("lenet5", data_dir=tmp_path).data == "digits"  # no CIFAR-10 there
    assert sweep_model("mlp@digits", data_dir=tmp_path).data == "digits"
    assert sweep_model("mlp").data == "digits"
