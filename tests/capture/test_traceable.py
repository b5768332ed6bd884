"""torch.nn's transformer modules traced layer by layer (mpcompile/capture/traceable.py): equal to the
modules in fp32, and every GEMM inside them under the policy."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import mpcompile
from mpcompile import ops
from lowered import check_low_precision_run, ops_called


class Classifier(nn.Module):
    """An encoder stack with a final norm, pre-norm layers and dropout, fed a padding mask."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x, padding):
        return self.head(self.encoder(x, src_key_padding_mask=padding).mean(1))


class CausalDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, activation="gelu")

    def forward(self, x, memory):
        return self.decoder(x, memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(x.shape[0]))


def _cases():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    return {
        "encoder stack": (Classifier(), (x, padding), [f"encoder_layers_{i}_{n}" for i in range(2)
                                                       for n in ("self_attn", "linear1", "linear2")] + ["head"]),
        "causal decoder layer": (CausalDecoder(), (x.transpose(0, 1), torch.randn(4, 3, 8)),
                                 ["decoder_self_attn", "decoder_multihead_attn", "decoder_linear1", "decoder_linear2"]),
        "encoder layer as the model": (nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), (x.transpose(0, 1),),
                                       ["self_attn", "linear1", "linear2"]),
        "transformer as the model": (nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True),
                                     (x, torch.randn(3, 4, 8)),
                                     ["encoder_layers_0_self_attn", "encoder_layers_0_linear1", "encoder_layers_0_linear2",
                                      "decoder_layers_0_self_attn", "decoder_layers_0_multihead_attn",
                                      "decoder_layers_0_linear1", "decoder_layers_0_linear2"]),
    }


CASES = list(_cases())


def _forward_backward(model, inputs, params):
    torch.manual_seed(1)  # the same dropout masks on both sides
    y = model(*inputs)
    return [y] + list(torch.autograd.grad(y.square().sum(), params))


@pytest.mark.parametrize("case", CASES)
def test_in_fp32_the_traced_model_equals_the_module_in_training_forward_and_backward(case):
    model, inputs, _ = _cases()[case]
    model.train()
    cm = mpcompile.compile(model, "version: 1\n", inputs)
    assert not any(n.op == "call_module" and isinstance(cm.graph_module.get_submodule(n.target), type(model))
                   for n in cm.graph_module.graph.nodes)  # traced through, not kept whole
    params = list(model.parameters())  # the compiled model's are the same tensors
    for got, want in zip(_forward_backward(cm, inputs, params), _forward_backward(model, inputs, params)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", CASES)
def test_every_gemm_inside_meets_the_policy(case):
    model, inputs, gemms = _cases()[case]
    fp8 = "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3, grad_output: fp8_e5m2}\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing runs in fp32 unannounced
        cm = mpcompile.compile(model, fp8, inputs)
    assert list(cm.assignments()) == gemms
    assert ops_called(cm) == [ops.multi_head_attention if "attn" in g else ops.linear for g in gemms]
    model.eval()  # no dropout: FP8 operands move the output by a few percent
    check_low_precision_run(cm, model, inputs)


def test_a_module_kept_whole_by_leaf_modules_runs_as_it_is_and_says_so():
    model, inputs, _ = _cases()["encoder stack"]
    fp8 = "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n"
    with pytest.warns(UserWarning, match=r"node encoder \(TransformerEncoder 'encoder'\): runs in fp32: torch.fx "
                                         r"keeps TransformerEncoder whole"):
        cm = mpcompile.compile(model, fp8, inputs, leaf_modules=(nn.TransformerEncoder,))
    assert list(cm.assignments()) == ["head"]


class CausalHintWithoutMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x, is_causal=True)


def test_a_causal_hint_without_its_mask_is_refused_as_torch_refuses_it():
    model, x = CausalHintWithoutMask(), torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        model(x)
    with pytest.raises(mpcompile.CompileError, match="is_causal=True is a hint that comes with the causal mask"):
        mpcompile.compile(model, "version: 1\n", (x,))
