"""A CompiledModel is an ordinary nn.Module (mpcompile/compiler.py): the source model's state_dict
keys, attributes that fall through, pickling and deep copies that reproduce it, modes captured on
first use, and torch.compile / torch.export of it."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpcompile
from mpcompile import CompileError
from mpcompile.models import build_model

DELAYED = ("version: 1\ndefault: {input: fp8_e4m3:tensor_delayed, weight: fp8_e4m3, grad_output: fp8_e5m2}\n"
           "levels:\n  - {name: fp8}\n  - {name: bf16, set: {input: bf16, weight: bf16}}\n")


class Net(nn.Module):
    """Functional dropout and batch norm that read ``self.training``: traced, they are frozen in one mode."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(6, 8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(8))  # a parameter of the root itself
        self.register_buffer("mean", torch.zeros(8))
        self.register_buffer("var", torch.ones(8))
        self.note = "a plain attribute"

    def describe(self) -> str:
        return "a method"

    def forward(self, x):
        h = F.batch_norm(self.fc(x), self.mean, self.var, training=self.training) * self.scale
        return self.out(F.dropout(F.relu(h), 0.5, training=self.training))


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    torch.manual_seed(3)
    want = a(x)
    torch.manual_seed(3)
    return torch.equal(want, b(x))


def test_state_dict_keys_and_attributes_are_the_source_models():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(5, 6)
    cm = mpcompile.compile(model, "hfp8", (x,))
    assert list(cm.state_dict()) == list(model.state_dict())
    assert cm.fc.weight is model.fc.weight and cm.scale is model.scale and cm.note == "a plain attribute"
    assert [id(p) for p in cm.parameters()] == [id(p) for p in model.parameters()]
    plain = Net()
    plain.load_state_dict(cm.state_dict())  # a compiled model's checkpoint into a plain model...
    cm.load_state_dict({k: v + 1 for k, v in plain.state_dict().items()})  # ...and a plain one's into it
    assert torch.equal(model.fc.weight, plain.fc.weight + 1)
    with pytest.raises(AttributeError, match=r"Net.describe is a method of the source model and would run it "
                                             r"uncompiled; call cm.source.describe"):
        cm.describe()
    assert cm.source.describe() == "a method"
    assert mpcompile.compile(cm, "fp32", (x,)).source is model  # compiled anew from its source


def test_each_mode_is_captured_on_first_use_and_runs_its_own_code():
    torch.manual_seed(0)
    model, x = Net().train(), torch.randn(5, 6)
    cm = mpcompile.compile(model, "fp32", (x,))
    cm.eval()
    assert not model.training and _same(model, cm, x) and cm.modes == ("train", "eval")
    assert torch.equal(cm.mean, torch.zeros(8))  # eval-mode batch norm leaves the running mean alone
    cm.train()
    assert model.training and _same(model, cm, x)
    assert not torch.equal(cm.mean, torch.zeros(8))  # ...and train mode updates it, on the source's buffer


def test_pickle_and_deepcopy_reproduce_assignments_levels_and_amax_history():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(5, 6)
    cm = mpcompile.compile(model, DELAYED, (x,))
    cm(x).sum().backward()
    cm.recompile(level={"out": "bf16"})
    cm.eval()(x)
    cm.train()
    assert cm.graph_module._mpc_amax is cm.eval().graph_module._mpc_amax  # one history per op, whichever mode runs
    buffer = io.BytesIO()
    torch.save(cm, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(cm), torch.load(buffer, weights_only=False)):
        cm.eval()
        assert copied.source is not model and copied.fc.weight is not model.fc.weight
        assert copied.modes == cm.modes and copied.level == {"out": "bf16"} and copied.warnings == cm.warnings
        assert copied.assignments() == cm.assignments() and copied.table() == cm.table()
        assert torch.equal(copied.graph_module._mpc_amax.fc, cm.graph_module._mpc_amax.fc)
        assert copied.graph_module._mpc_amax.fc is copied.train().graph_module._mpc_amax.fc
    for mode in (False, True):  # the copies ran nothing above, and their histories moved with cm's since
        cm.train(mode)
        assert _same(cm, copy.deepcopy(cm), x)


def test_torch_compile_and_torch_export_of_a_compiled_model():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(5, 4)
    cm = mpcompile.compile(model, "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n", (x,))
    want = cm(x)
    assert torch.equal(torch.compile(cm, backend="aot_eager")(x), want)
    program = torch.export.export(cm, (x,), strict=False)
    assert torch.equal(program.module()(x), want)
    assert sum(str(n.target).startswith("mpc.") for n in program.graph.nodes) == 2


def test_a_wrong_example_input_names_the_node_its_module_and_the_shapes():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(CompileError, match=r"node _0 \(Linear, module '0'\) fails on the example inputs: RuntimeError: "
                                           r"mat1 and mat2 shapes cannot be multiplied \(5x5 and 4x8\)\n  it got: "
                                           r"\(5, 5\) float32"):
        mpcompile.compile(model, "fp32", (torch.randn(5, 5),))
    with pytest.raises(CompileError, match=r"node _0 \(Linear, module '0'\) fails on the example inputs: RuntimeError: "
                                           r".*\n  it got: \(5, 4\) int64"):
        mpcompile.compile(model, "fp32", (torch.ones(5, 4, dtype=torch.long),))


def test_load_state_dict_with_assign_rebinds_every_mode():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(5, 6)
    cm = mpcompile.compile(model, "hfp8", (x,), capture="export")
    cm.eval()(x)
    new = {k: torch.rand_like(v) + 0.5 for k, v in Net().state_dict().items()}  # positive: var is a variance
    cm.load_state_dict(new, assign=True)
    assert cm.fc.weight is model.fc.weight and torch.equal(model.fc.weight, new["fc.weight"])
    reference = mpcompile.compile(Net(), "hfp8", (x,), capture="export")
    reference.load_state_dict(new)  # copied into its own tensors
    for mode in (True, False):  # the train run moves both models' running statistics alike
        assert _same(reference.train(mode), cm.train(mode), x)


def test_a_second_mode_takes_the_first_modes_kappa_and_so_its_assignments():
    torch.manual_seed(0)
    model, x = Net().train(), torch.randn(5, 6)
    policy = ("version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n"
              "rules:\n  - match: {kappa_above: 1.5}\n    input: bf16\n")
    cm = mpcompile.compile(model, policy, (x,))
    trained = {n.name: (m.kappa, m.assignment) for n, m in cm.annotations()}
    cm.eval()(x)  # dropout off: estimated again, the kappas would differ
    assert {n.name: (m.kappa, m.assignment) for n, m in cm.annotations()} == trained
    assert any(a is not None and dict(a.roles)["input"].quant.fmt.name == "bf16" for _, a in trained.values())


def test_parameters_narrower_than_compiled_warn_once_naming_the_roles_they_round():
    torch.manual_seed(0)
    cm = mpcompile.compile(build_model("lenet5"), "fp16", (torch.randn(2, 1, 8, 8),)).to(torch.bfloat16)
    x = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="the parameters are bfloat16 at this call") as caught:
        assert cm(x).dtype == torch.bfloat16
    text = next(str(w.message) for w in caught if "parameters are bfloat16" in str(w.message))
    assert "node features_0 (Conv2d 'features.0'): input fp16, weight fp16" in text  # fp16 holds what bf16 cannot
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm(x)  # once per mode and dtype
    fp8 = mpcompile.compile(build_model("lenet5"), "fp8_e4m3", (torch.randn(2, 1, 8, 8),)).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="the parameters are bfloat16") as caught:
        fp8(x)
    text = next(str(w.message) for w in caught if "parameters are bfloat16" in str(w.message))
    assert "node features_0" not in text and "ops the policy leaves in fp32" in text  # e4m3 roles fit bf16


def test_a_mode_first_called_after_a_cast_is_captured_on_the_example_inputs_cast_as_well():
    torch.manual_seed(0)
    model = build_model("lenet5")
    cm = mpcompile.compile(copy.deepcopy(model), "fp16", (torch.randn(2, 1, 8, 8),)).to(torch.bfloat16)
    low = copy.deepcopy(model).to(torch.bfloat16).eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the narrower parameters' warning, tested above
        eval_out = cm.eval()(x)  # eval mode's capture runs the fp32 example on bf16 weights unless it is cast
        expected = mpcompile.compile(low, "fp16", (x,))(x)
    assert eval_out.dtype == torch.bfloat16 and torch.equal(eval_out, expected)


def test_graph_state_round_trips_and_refuses_another_models_histories():
    cm = mpcompile.compile(Net(), DELAYED, (torch.randn(4, 6),))
    cm(torch.randn(4, 6))
    saved = {k: v.clone() for k, v in cm.graph_state_dict().items()}
    assert saved and all(bool(v.any()) for v in saved.values())
    cm(torch.randn(4, 6) * 100)  # a new amax enters each history
    cm.load_graph_state_dict(saved)
    assert all(torch.equal(v, saved[k]) for k, v in cm.graph_state_dict().items())
    with pytest.raises(CompileError, match="'_mpc_amax.nowhere' is not this model's"):
        cm.load_graph_state_dict({"_mpc_amax.nowhere": torch.zeros(1)})
    fresh = mpcompile.compile(Net(), "bf16", (torch.randn(4, 6),))  # no late scaling at this level: none held
    assert fresh.graph_state_dict() == {}
    fresh.load_graph_state_dict(saved)  # kept for a recompile that scales late again, as the saved run had them
    fresh.recompile(DELAYED)
    assert all(torch.equal(v, saved[k]) for k, v in fresh.graph_state_dict().items()) and fresh.graph_state_dict()
