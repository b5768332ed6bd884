"""mpcompile.compile: trace, assign, lower, recompile (mpcompile/compiler.py and passes/)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpcompile
from mpcompile import CompileError, ops, quantize


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1)) + 1


def _model_and_input():
    torch.manual_seed(0)
    return SmallCNN(), torch.randn(2, 3, 16, 16)


def _grads(model, x):
    model.zero_grad()
    y = model(x)
    y.square().sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


def _mpc_calls(cm) -> list[str]:
    return [n.target.__name__ for n in cm.graph_module.graph.nodes
            if n.op == "call_function" and n.target.__module__ == "mpcompile.ops.api"]


def test_fp32_policy_is_bit_identical_and_shares_parameters():
    model, x = _model_and_input()
    cm = mpcompile.compile(model, "version: 1\n", (x,))
    assert _mpc_calls(cm) == []
    assert [id(p) for p in cm.parameters()] == [id(p) for p in model.parameters()]
    y, grads = _grads(model, x)
    y_c, grads_c = _grads(cm, x)
    assert torch.equal(y, y_c) and all(torch.equal(a, b) for a, b in zip(grads, grads_c))


def test_fp8_roles_equal_a_hand_quantized_reference():
    model, x = _model_and_input()
    cm = mpcompile.compile(model, """
version: 1
default: {input: fp8_e4m3, weight: fp8_e4m3}
rules:
  - match: {type: activation}
    output: bf16
""", (x,))
    assert _mpc_calls(cm) == ["conv2d", "quant", "conv2d", "quant", "linear"]
    q8 = lambda t: quantize(t, "fp8_e4m3")
    h = quantize(F.relu(F.conv2d(q8(x), q8(model.conv1.weight), model.conv1.bias, padding=1)), "bf16")
    h = quantize(torch.relu(F.conv2d(q8(h), q8(model.conv2.weight), stride=2)), "bf16")
    want = F.linear(q8(h.flatten(1)), q8(model.fc.weight), model.fc.bias) + 1
    assert torch.equal(cm(x), want)


def test_keep_rules_insert_nothing_and_arithmetic_reaches_the_ops():
    model, x = _model_and_input()
    spec = "{acc: e5m10, order: chunk(8)}"
    cm = mpcompile.compile(model, f"""
version: 1
default: {{weight: fp8_e5m2, forward: {spec}}}
rules:
  - match: {{first: true}}
    keep: fp32
  - match: {{last: true}}
    keep: fp32
""", (x,))
    assert _mpc_calls(cm) == ["conv2d"]
    assignment = cm.assignments()["conv2"]
    assert assignment.forward == ops.ArithSpec(acc="e5m10", order="chunk(8)") and assignment.backward.is_native
    h = F.relu(model.conv1(x))
    h = torch.relu(ops.conv2d(h, model.conv2.weight, stride=2, formats={"weight": "fp8_e5m2"},
                              forward=assignment.forward))
    assert torch.equal(cm(x), model.fc(h.flatten(1)) + 1)
    assert cm.assignments()["conv1"].quantizes is False  # kept, recorded for inspection


def test_recompile_switches_levels_and_keeps_the_optimizer_working():
    model, x = _model_and_input()
    cm = mpcompile.compile(model, """
version: 1
default: {input: fp8_e4m3, weight: fp8_e4m3}
levels:
  - {name: fp8}
  - {name: bf16, set: {input: bf16, weight: bf16}}
  - {name: fp32, keep: fp32}
""", (x,))
    params = [id(p) for p in cm.parameters()]
    opt = torch.optim.SGD(cm.parameters(), lr=0.1)
    low = cm(x)
    cm.recompile(level="bf16")
    assert cm.level == "bf16" and str(cm.assignments()["fc"].roles[0][1].quant) == "bf16"
    cm.recompile(level=2)
    assert _mpc_calls(cm) == [] and torch.equal(cm(x), model(x)) and not torch.equal(low, model(x))
    cm(x).sum().backward()
    opt.step()  # the optimizer's parameters are the model's
    assert [id(p) for p in cm.parameters()] == params and torch.equal(cm(x), model(x))
    cm.recompile(policy="version: 1\ndefault: {weight: bf16}\n")
    assert cm.level == 0 and _mpc_calls(cm) == ["conv2d", "conv2d", "linear"]


def test_a_rule_that_matches_nothing_is_a_warning():
    model, x = _model_and_input()
    with pytest.warns(UserWarning, match=r"rules\[0\] \(<string>:3:5\): matches no op"):
        cm = mpcompile.compile(model, "version: 1\nrules:\n  - match: {name: encoder}\n    keep: fp32\n")
    assert cm.warnings == ["rules[0] (<string>:3:5): matches no op of this model"]


class Untraceable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = Untraceable()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.branch(x))


def test_untraceable_models_name_the_line_and_the_way_out():
    with pytest.raises(CompileError, match=r"(?s)cannot trace Wrapper.*if x\.sum\(\) > 0:.*leaf_modules=\(Untraceable,\)"):
        mpcompile.compile(Wrapper(), "version: 1\n")
    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm = mpcompile.compile(Wrapper(), "version: 1\ndefault: {weight: bf16}\n", leaf_modules=(Untraceable,))
    model = cm.graph_module
    assert _mpc_calls(cm) == ["linear"]
    assert torch.equal(cm(x), F.linear(model.branch(x), quantize(model.fc.weight, "bf16"), model.fc.bias))


def test_shape_propagation_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cm = mpcompile.compile(model, "version: 1\n", (torch.randn(1, 3, 8, 8),))  # batch 1: train-mode BN would fail
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats untouched
    assert cm.annotated.graph.find_nodes(op="call_module", target="3")[0].meta["mpc"].shape == (1, 4, 1, 1)


def test_roles_an_op_lacks_are_reported():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, bias=False), nn.ReLU())
    policy = "version: 1\nrules:\n  - match: {type: norm}\n    bias: bf16\n    output: bf16\n" \
             "  - match: {type: ReLU}\n    weight: bf16\n"
    with pytest.warns(UserWarning) as caught:
        cm = mpcompile.compile(model, policy)
    assert [str(w.message) for w in caught] == [
        "mpcompile: node _1 (LayerNorm '1'): bias not applied: this op's roles are input, output, weight",
        "mpcompile: node _2 (ReLU '2'): weight not applied: this op's roles are input, output"]
    x = torch.randn(3, 4)
    assert torch.equal(cm(x), F.relu(quantize(model[1](model[0](x)), "bf16")))  # the output role is applied


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.gn_w, self.gn_b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.ln = nn.LayerNorm(5)

    def forward(self, x):
        x = F.group_norm(self.bn(x), 2, self.gn_w, bias=self.gn_b)
        return F.layer_norm(self.ln(x), (5,), self.ln.weight * 2)


def test_norm_weight_and_bias_roles_quantize_the_affine_parameters():
    torch.manual_seed(0)
    model, x = Norms(), torch.randn(3, 4, 6, 5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 3)
    with pytest.warns(UserWarning, match=r"node layer_norm \(layer_norm 'layer_norm'\): bias not applied"):
        cm = mpcompile.compile(model, "version: 1\nrules:\n  - match: {type: norm}\n    weight: fp8_e4m3\n"
                                      "    bias: fp8_e5m2:toward_zero\n", (x,))
    bn = cm.annotated.graph.find_nodes(op="call_module", target="bn")[0].meta["mpc"]
    assert set(bn.stats) == {"weight", "bias"} and bn.sqnr_db is not None
    q8, q5 = (lambda t: quantize(t.detach(), "fp8_e4m3")), (lambda t: quantize(t.detach(), "fp8_e5m2", "toward_zero"))
    stats = {k: v.clone() for k, v in model.bn.state_dict().items()}
    y = cm(x)  # training mode: batch statistics, and the running ones move in place
    mean, var = torch.zeros(4), torch.ones(4)
    h = F.batch_norm(x, mean, var, q8(model.bn.weight), q5(model.bn.bias), True, 0.1, model.bn.eps)
    h = F.group_norm(h, 2, q8(model.gn_w), q5(model.gn_b))
    want = F.layer_norm(F.layer_norm(h, (5,), q8(model.ln.weight), q5(model.ln.bias)), (5,), q8(model.ln.weight * 2))
    assert torch.equal(y, want)
    assert torch.equal(model.bn.running_mean, mean) and torch.equal(model.bn.running_var, var)
    assert not torch.equal(model.bn.running_mean, stats["running_mean"]) and model.bn.num_batches_tracked == 1
    y.square().sum().backward()  # straight through: every parameter gets its gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("padding_mode,padding", [("reflect", 1), ("circular", 2), ("replicate", "same"),
                                                  ("zeros", "same")])
def test_conv_padding_modes_lower_as_the_module_pads(padding_mode, padding):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, (3, 4), padding=padding, padding_mode=padding_mode))
    x = torch.randn(2, 3, 7, 7)
    y, grads = _grads(model, x)
    y_c, grads_c = _grads(mpcompile.compile(model, "fp32"), x)
    assert torch.equal(y, y_c) and all(torch.equal(a, b) for a, b in zip(grads, grads_c))
    cm = mpcompile.compile(model, "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n")
    conv, q8 = model[0], lambda t: quantize(t.detach(), "fp8_e4m3")
    padded = x if padding_mode == "zeros" else F.pad(x, conv._reversed_padding_repeated_twice, mode=padding_mode)
    want = F.conv2d(q8(padded), q8(conv.weight), conv.bias, padding=padding if padding_mode == "zeros" else 0)
    assert want.shape == y.shape and torch.equal(cm(x), want)


class CallsOps(nn.Module):
    """A model written with mpcompile.ops: its own op is kept, the policy lowers the rest."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(ops.linear(x, self.w, formats={"weight": "bf16"}, forward="acc=bf16 order=chunk(2)"))


def test_models_that_call_mpcompile_ops_trace_and_keep_their_ops():
    torch.manual_seed(0)
    model, x = CallsOps(), torch.randn(4, 5)
    assert torch.equal(mpcompile.compile(model, "fp32")(x), model(x))
    cm = mpcompile.compile(model, "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n")
    assert _mpc_calls(cm) == ["linear", "linear"]
    q8 = lambda t: quantize(t.detach(), "fp8_e4m3")
    h = ops.linear(x, model.w, formats={"weight": "bf16"}, forward="acc=bf16 order=chunk(2)")
    assert torch.equal(cm(x), F.linear(q8(h), q8(model.fc.weight), model.fc.bias))


def test_shipped_fp8_e4m3_equals_a_hand_quantized_reference_forward_and_backward():
    """policies/fp8_e4m3.yaml: input, weight and grad_output of every GEMM in E4M3, each scaled
    by 448 / amax before rounding and back after; the gradient GEMMs take the quantized operands."""
    model, x = _model_and_input()
    cm = mpcompile.compile(model, "policies/fp8_e4m3.yaml")

    def q(t: torch.Tensor) -> torch.Tensor:
        s = 448 / t.detach().abs().max().double()
        return (quantize(t.detach().double() * s, "fp8_e4m3") / s).float()

    y, grads = _grads(cm, x)
    h1 = F.relu(F.conv2d(q(x), q(model.conv1.weight), model.conv1.bias, padding=1))
    h2 = torch.relu(F.conv2d(q(h1), q(model.conv2.weight), stride=2)).flatten(1)
    want = F.linear(q(h2), q(model.fc.weight), model.fc.bias) + 1
    assert torch.equal(y, want)
    g = q(2 * want)  # d(y²)/dy reaches fc as its grad_output
    assert torch.equal(grads[-2], g.T @ q(h2)) and torch.equal(grads[-1], g.sum(0))  # the bias sees it too


def test_torch_compile_of_a_compiled_model_keeps_the_mpc_ops_opaque_and_the_numbers():
    """torch.compile over a CompiledModel: every mpc:: op stays one opaque call in the captured
    graph (dynamo does not trace into the emulation), and forward and backward equal eager."""
    policy = """
version: 1
default:
  input: fp8_e4m3
  weight: fp8_e4m3:tensor_delayed
  grad_output: fp8_e5m2:stochastic
  forward: {acc: bf16, order: chunk(16)}
"""
    model, x = _model_and_input()
    cm = mpcompile.compile(model, policy, (x,))
    captured = []

    def backend(gm, example_inputs):
        captured.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def run(m):
        torch.manual_seed(3)  # the stochastic grad_output draws its seed from torch's generator
        with torch.no_grad():
            for buf in cm.buffers():
                buf.zero_()  # the amax histories start empty in both runs
        return _grads(m, x)

    eager, g_eager = run(cm)
    compiled, g_compiled = run(torch.compile(cm, fullgraph=True, backend=backend))
    assert torch.equal(compiled, eager) and all(torch.equal(a, b) for a, b in zip(g_compiled, g_eager))
    mpc = sorted(str(t) for t in captured if str(t).startswith("mpc."))
    assert mpc == ["mpc.conv", "mpc.conv"] + ["mpc.delayed_scales"] * 3 + ["mpc.linear"]


def test_per_op_levels_apply_to_the_named_ops_and_unknown_names_are_refused():
    policy = """
version: 1
default: {input: fp8_e4m3, weight: fp8_e4m3}
levels:
  - {name: fp8}
  - {name: bf16, set: {input: bf16, weight: bf16}}
"""
    model, x = _model_and_input()
    cm = mpcompile.compile(model, policy, (x,), level={"conv2": "bf16"})
    inputs = {op: str(dict(a.roles)["input"].quant.fmt) for op, a in cm.assignments().items()}
    assert inputs == {"conv1": "fp8_e4m3", "conv2": "bf16", "fc": "fp8_e4m3"}
    with pytest.raises(CompileError, match=r"no op named 'conv3'.*keyed by node name"):
        cm.recompile(level={"conv3": 1})


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


class UnemulatedGemms(nn.Module):
    """GEMM work that lowering does not emulate, beside a Linear that it does."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 1, 2, stride=2)
        self.rnn = nn.GRU(4, 4, batch_first=True)
        self.block = Block()
        self.fc = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        h = self.up(x, output_size=[6, 6]).flatten(1)[:, :12].view(-1, 3, 4)  # output_size: not emulated
        h = self.rnn(h)[0]
        return self.fc(self.block(torch.einsum("bti,ij,jk->btk", h, self.w, self.w)))  # three operands


def test_gemm_work_that_runs_in_fp32_under_a_quantizing_policy_is_a_warning_naming_node_and_module():
    torch.manual_seed(0)
    model, x = UnemulatedGemms(), torch.randn(2, 2, 3, 3)
    fp8 = "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n"
    with pytest.warns(UserWarning, match="runs in fp32") as record:
        cm = mpcompile.compile(model, fp8, (x,), leaf_modules=(Block,))
    assert list(cm.assignments()) == ["fc"]
    assert len(cm.warnings) == len(record) == 4
    up, rnn, einsum, block = cm.warnings
    assert up.startswith("node up (ConvTranspose2d 'up'): runs in fp32: ConvTranspose2d called with output_size is "
                         "not emulated, so the policy's input, weight for it are not applied")
    assert rnn.startswith("node rnn (GRU 'rnn'): runs in fp32: GRU is not emulated")
    assert einsum.startswith("node einsum (einsum 'einsum'): runs in fp32: einsum 'bti,ij,jk->btk' is not emulated")
    assert block.startswith("node block (Block 'block'): runs in fp32: torch.fx keeps Block whole")
    assert "layers inside it (fc) are not emulated" in block
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mpcompile.compile(model, "version: 1\n", (x,), leaf_modules=(Block,)).warnings == []
        keep = fp8 + "rules:\n  - match: {type: [ConvTranspose2d, GRU, einsum, Block]}\n    keep: fp32\n"
        assert mpcompile.compile(model, keep, (x,), leaf_modules=(Block,)).warnings == []
    # a rule by name reaches the einsum: its input and output roles are applied, its weight and arithmetic not
    named = "version: 1\nrules:\n  - match: {name: einsum}\n    input: bf16\n    weight: bf16\n    forward: {acc: bf16}\n"
    with pytest.warns(UserWarning):
        cm = mpcompile.compile(model, named, (x,), leaf_modules=(Block,))
    assert [w.split(": runs")[0] for w in cm.warnings] == ["node einsum (einsum 'einsum')"]
    assert "so the policy's weight, forward arithmetic for it are not applied" in cm.warnings[0]
    assert list(cm.assignments()) == ["einsum"]


class Mixed(nn.Module):
    """Values that are not float tensors among an op's inputs and outputs: a size, integer
    indices, a (values, indices) tuple, a list of tensors."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x, i):
        h = x.view(x.size(0), -1) + self.embed(i).sum(1)
        top, index = torch.max(self.fc(h), dim=1, keepdim=True)
        return self.fc(torch.cat([h[:, :2], h[:, 2:]], 1)) * index.float() + top


def test_every_op_rounds_its_float_tensors_only_with_or_without_example_inputs():
    torch.manual_seed(0)
    model, x, i = Mixed(), torch.randn(2, 3, 4), torch.randint(0, 5, (2, 3))
    every = "version: 1\nrules:\n  - match: {}\n    input: e3m2\n    output: e3m2\n"
    shaped, unshaped = mpcompile.compile(model, every, (x, i)), mpcompile.compile(model, every)
    targets = lambda cm: [n.target.__name__ for n in cm.graph_module.graph.nodes if n.op == "call_function"
                          and n.target.__name__ in ("quant", "quant_floats")]
    # the size and the indices are known not to be float tensors where the shape pass ran
    assert "quant_floats" not in targets(shaped) and set(targets(unshaped)) == {"quant_floats"}
    assert len(targets(shaped)) < len(targets(unshaped))
    y1, y2 = shaped(x, i), unshaped(x, i)
    y1.sum().backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y2.sum().backward()
    assert torch.equal(y1, y2) and all(torch.equal(a, p.grad) for a, p in zip(g1, model.parameters()))
    q = lambda t: quantize(t, "e3m2")  # every float tensor an op takes or makes, once (rounding is idempotent)
    with torch.no_grad():
        h = q(q(q(x).view(2, -1)) + q(q(model.embed(i)).sum(1)))
        top, index = torch.max(q(model.fc(h)), dim=1, keepdim=True)
        want = q(q(q(model.fc(h)) * index.float()) + top)
    assert torch.equal(y1, want)


class OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None, double=False):
        y = self.fc(x)
        if mask is not None:
            y = y.masked_fill(mask, 0.0)
        return 2 * y if double else y


def test_optional_arguments_the_example_inputs_leave_out_are_traced_at_their_defaults():
    torch.manual_seed(0)
    model, x, mask = OptionalMask(), torch.randn(2, 4), torch.rand(2, 4) > 0.5
    for example in ((x,), None):  # fx alone would trace `mask is not None` as true, and fail on `if double`
        cm = mpcompile.compile(model, "fp32", example)
        assert torch.equal(cm(x), model(x))
        with pytest.raises(CompileError, match="OptionalMask.forward: argument 'mask' was traced at its default .* "
                                               "pass it in example_inputs"):
            cm(x, mask)
    cm = mpcompile.compile(model, "version: 1\ndefault: {input: bf16}\n", (x, mask))
    assert torch.equal(cm(x, mask), model(quantize(x, "bf16"), mask))


class InPlace(nn.Module):
    """Activations that write into their input, which later ops read."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.fc1(x)
        F.relu(h, inplace=True)
        self.act(h)
        h.mul_(3.0)
        return self.fc2(h)


@pytest.mark.parametrize("role", ["input", "output"])
def test_an_in_place_op_under_formats_leaves_its_input_as_the_op_would(role):
    torch.manual_seed(0)
    model, x = InPlace(), torch.randn(3, 4)
    cm = mpcompile.compile(model, f"version: 1\nrules:\n  - match: {{type: [relu, ReLU, mul_]}}\n    {role}: e3m2\n",
                           (x,))
    q = lambda t: quantize(t, "e3m2")
    with torch.no_grad():
        h = q(q(q(model.fc1(x)).relu()).relu() * 3.0) if role == "output" else q(q(q(model.fc1(x)).relu()).relu()) * 3.0
        assert torch.equal(cm(x), model.fc2(h))
    cm(x).square().sum().backward()  # autograd keeps what the op wrote: the input is written after it
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
