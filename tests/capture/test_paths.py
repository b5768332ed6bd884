"""The capture paths (mpcompile/capture/paths.py): a GraphModule as it is, fx (into fx.wrap-ped
functions), torch.export; auto's choice and its errors; one policy fits fx and export graphs."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

import mpcompile
from mpcompile import CompileError
from zoo import HF, TORCHVISION

FP8 = "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n"


@torch.fx.wrap
def scaled_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Wrapped as libraries wrap helpers fx must not trace into; its body is traceable."""
    return (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5


class Scores(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return scaled_scores(self.q(x), self.k(x)).softmax(-1)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -x


def test_a_graph_module_is_used_as_it_is_and_left_untouched():
    model, x = Scores(), torch.randn(2, 3, 8)
    gm = torch.fx.symbolic_trace(model)  # fx keeps the wrapped function whole here
    cm = mpcompile.compile(gm, FP8, (x,))
    assert cm.capture == "graph" and not any("mpc" in n.meta for n in gm.graph.nodes)
    assert [n.meta["mpc"].op_type for n, _ in cm.annotations() if n.op == "call_function"][:1] == ["scaled_scores"]
    assert any("aten.matmul" not in w and "aten.bmm" in w and "scaled_scores" in w for w in cm.warnings)
    with pytest.warns(UserWarning, match=r"GraphModule and is used as it is: its code, traced in one mode, runs in eval "
                                         r"mode too") as issued:
        cm.eval()(x)
    assert not any("scaled_scores" in str(w.message) for w in issued)  # the first mode's warnings are not repeated


def test_fx_traces_into_a_wrapped_function_whose_body_traces():
    torch.manual_seed(0)
    model, x = Scores(), torch.randn(2, 3, 8)
    cm = mpcompile.compile(model, FP8, (x,))
    assert cm.capture == "fx" and cm.warnings == []
    assert [m.kind for _, m in cm.annotations() if m.group == "gemm"] == ["linear", "linear", "matmul"]


def test_swin_attention_kept_whole_by_fx_is_reported_and_strict_refuses_it():
    z = TORCHVISION["swin_t"]
    model = z.build().eval()
    with pytest.warns(UserWarning, match=r"runs in fp32: aten\.(addmm|bmm|mm).* run in fp32 inside "
                                         r"shifted_window_attention, which lowering does not emulate"):
        cm = mpcompile.compile(model, FP8, z.args(), capture="fx", calibration=[])
    assert "fp32: not emulated, aten." in cm.table() and "fp32, not emulated: " in json.loads(cm.to_json())["description"]
    with pytest.raises(CompileError, match=r"(?s)strict: GEMM work runs in fp32 where the policy quantizes it:.*"
                                           r"shifted_window_attention"):
        mpcompile.compile(model, FP8, z.args(), capture="fx", calibration=[], strict=True)
    auto = mpcompile.compile(model, FP8, z.args(), calibration=[], strict=True)  # export traces through it
    assert auto.capture == "export" and sum(m.kind == "matmul" for _, m in auto.annotations()) == 2 * 4  # q@k, p@v


def test_auto_says_what_each_path_said():
    with pytest.raises(CompileError, match=r"(?s)cannot capture DataDependent; tried:\n  fx: torch\.fx cannot trace "
                                           r"DataDependent: TraceError: .*\n  export: GuardOnDataDependentSymNode: "):
        mpcompile.compile(DataDependent(), FP8, (torch.randn(2, 4),))
    with pytest.raises(CompileError, match=r"export: not tried: it needs example inputs"):
        mpcompile.compile(DataDependent(), FP8)
    with pytest.raises(CompileError, match=r"capture='export' needs example inputs"):
        mpcompile.compile(Scores(), FP8, capture="export")
    with pytest.raises(CompileError, match=r"capture='trace': choose one of auto, fx, export, graph"):
        mpcompile.compile(Scores(), FP8, capture="trace")
    with pytest.raises(CompileError, match=r"torch\.fx cannot trace BertModel"):
        z = HF["bert"]
        mpcompile.compile(z.build(), FP8, example_kwargs=z.kwargs(), capture="fx")


def test_one_policy_fits_the_fx_and_the_export_graph():
    torch.manual_seed(0)
    model, x = Scores(), torch.randn(2, 3, 8)
    policy = FP8 + "rules:\n  - match: {type: Linear, name_regex: '^k$'}\n    input: bf16\n"
    traced = mpcompile.compile(model, policy, (x,), capture="fx")
    exported = mpcompile.compile(model, policy, (x,), capture="export")
    names = lambda cm: [(m.name, m.op_type) for _, m in cm.annotations() if m.group == "gemm"]
    assert names(traced) == names(exported) == [("q", "Linear"), ("k", "Linear"), ("matmul", "matmul")]
    assert [r["match"] for r in json.loads(exported.to_json())["rules"]][:2] == [{"name_regex": "q"}, {"name_regex": "k"}]
    assert torch.equal(traced(x), exported(x))


def test_an_exported_model_takes_other_batch_sizes_and_sequence_lengths():
    z = HF["bert"]
    model = z.build().eval()
    cm = mpcompile.compile(model, FP8, example_kwargs=z.kwargs(), calibration=[])
    ids, mask = torch.randint(3, 64, (3, 5)), torch.ones(3, 5, dtype=torch.long)
    assert torch.equal(cm(input_ids=ids, attention_mask=mask).last_hidden_state,
                       cm(ids, mask).last_hidden_state)  # positional or keyword, as the source takes them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = cm(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == (3, 5, 16) and torch.isfinite(out).all()


def test_a_call_that_does_not_fit_the_captured_arguments_says_what_they_are():
    z = HF["gpt2"]
    cm = mpcompile.compile(z.build(), FP8, example_kwargs={"input_ids": z.kwargs()["input_ids"]}, calibration=[])
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel was captured with the arguments \(input_ids\) and this call "
                                        r"does not fit them: got an unexpected keyword argument 'labels'"):
        cm(input_ids=z.kwargs()["input_ids"], labels=z.kwargs()["input_ids"])


def test_a_strided_example_input_does_not_tie_the_export_graph_to_its_strides():
    torch.manual_seed(0)
    model, strided = nn.Linear(8, 4), torch.randn(4, 9)[:, :8]
    cm = mpcompile.compile(model, "fp32", (strided,), capture="export")
    for x in (strided, torch.randn(6, 8), torch.randn(6, 10)[:, 1:9]):
        assert torch.equal(cm(x), model(x))


def test_a_batch_of_one_is_exported_for_any_batch_and_other_image_sizes_are_refused():
    torch.manual_seed(0)
    z = HF["gpt2"]
    model = z.build().eval()
    one = z.kwargs()["input_ids"][:1]
    cm = mpcompile.compile(model, "fp32", example_kwargs={"input_ids": one}, calibration=[])
    for ids in (one, torch.randint(3, 64, (3, 5)), torch.randint(3, 64, (1, 1))):
        assert torch.equal(cm(input_ids=ids).logits, model(input_ids=ids).logits)
    vit = HF["vit"]
    cm = mpcompile.compile(vit.build().eval(), "fp32", example_kwargs=vit.kwargs(), calibration=[])
    with pytest.raises(CompileError, match=r"ViTModel was captured by torch\.export for inputs of other shapes: Guard "
                                           r"failed: .*; compile it with example inputs of the shapes it is called with"):
        cm(pixel_values=torch.randn(1, 3, 64, 64))


def test_export_says_that_it_does_not_keep_leaf_modules_opaque():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    with pytest.warns(UserWarning, match=r"Scores was captured by torch\.export, which does not keep leaf_modules "
                                         r"\(Linear\) opaque: the ops inside them are captured"):
        cm = mpcompile.compile(Scores(), FP8, (x,), capture="export", leaf_modules=(nn.Linear,))
    assert [m.kind for _, m in cm.annotations() if m.group == "gemm"] == ["linear", "linear", "matmul"]


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, bias=None, mask=None):
        y = self.fc(x) if bias is None else self.fc(x) + bias
        return y if mask is None else y * mask


def test_fx_takes_keyword_example_inputs_at_their_parameters_places():
    torch.manual_seed(0)
    model, x, mask = Masked(), torch.randn(3, 4), (torch.rand(3, 4) > 0.5).float()
    cm = mpcompile.compile(model, "version: 1\ndefault: {output: bf16}\n", (x,), example_kwargs={"mask": mask})
    assert cm.capture == "fx" and torch.equal(cm(x, mask=mask), cm(x, None, mask))
    assert not torch.equal(cm(x, mask=mask), model(x, mask=mask)) and torch.equal(cm(x, mask=mask),
                                                                                    cm(x, mask=mask).bfloat16().float())
    with pytest.raises(CompileError, match=r"inputs \(1 positional, maks\) do not match forward's parameters "
                                           r"\(x, bias\w*, mask\w*\): got an unexpected keyword argument 'maks'"):
        mpcompile.compile(model, "fp32", (x,), example_kwargs={"maks": mask}, capture="fx")
