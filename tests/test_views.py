"""Views of a CompiledModel (mpcompile/views.py): table, explain, the JSON lock."""
from __future__ import annotations

import io
import json
from xml.etree import ElementTree

import pytest
import torch

import mpcompile

from test_compiler import SmallCNN

POLICY = """
version: 1
name: demo
default: {input: fp8_e4m3, weight: "fp8_e4m3:channel", grad_output: {format: fp8_e5m2, rounding: stochastic, sr_bits: 9}}
rules:
  - match: {first: true}
    keep: fp32
  - match: {type: activation}
    output: bf16
  - match: {last: true}
    weight: bf16
    forward: {acc: fp16, order: chunk(4)}
levels:
  - {name: fp8}
  - {name: wide, set: {input: e5m10}}
"""


def _compiled(level=0):
    torch.manual_seed(0)
    model, x = SmallCNN(), torch.randn(2, 3, 16, 16)
    return mpcompile.compile(model, POLICY, (x,), level=level), x, model


def _resolved(cm):
    return {name: (a.roles, a.forward, a.backward) for name, a in cm.assignments().items()}


def test_table_lists_formats_arithmetic_and_deciders():
    cm, _, _ = _compiled()
    lines = cm.table().splitlines()
    assert lines[0] == "policy 'demo' (<string>), level 0, captured by fx, train mode"
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert rows["conv1"][2:9] == ["conv1", "2x8x16x16", "fp32", "fp32", "fp32", "fp32", "torch"]
    assert rows["conv2"][4:8] == ["fp8_e4m3", "fp8_e4m3:channel", "-", "fp8_e5m2:stochastic:sr_bits=9"]
    assert rows["fc"][5] == "bf16" and "acc=fp16" in rows["fc"] and rows["fc"][-4] == "default,rules[2]"
    assert rows["relu_1"][6] == "bf16"
    # calibration (the example inputs): kappa p99, overflow / flush-to-zero %, SQNR against fp32
    kappa = cm.annotated.graph.find_nodes(op="call_module", target="fc")[0].meta["mpc"].kappa.p99
    assert rows["fc"][-3] == f"{kappa:.3g}" and rows["conv1"][-2:] == ["-", "-"]
    ovf, ftz = map(float, rows["conv2"][-2].split("/"))
    assert ovf == 0 and 0 <= ftz < 5 and 10 < float(rows["conv2"][-1]) < 60


def test_explain_lists_every_section_that_applied():
    cm, _, _ = _compiled(level="wide")
    text = cm.explain("fc").splitlines()
    assert text[0] == "fc: Linear 'fc' (group gemm, GEMM index 2)"
    assert text[1].startswith("  default: input=fp8_e4m3, weight=fp8_e4m3:channel, grad_output=fp8_e5m2:stochastic")
    assert text[2] == "  rules[2] (<string>:10:5): weight=bf16, forward=(acc=fp16 order=chunk(4))"
    assert text[3].startswith("  => input=e5m10, weight=bf16, grad_output=fp8_e5m2:stochastic:sr_bits=9; forward acc=fp16")
    with pytest.raises(KeyError, match="no op named 'conv' in this model; ops containing it: conv1, conv2"):
        cm.explain("conv")


@pytest.mark.parametrize("level", [0, 1])
def test_the_lock_reproduces_the_compiled_model(level):
    cm, x, model = _compiled(level)
    text = cm.to_json()
    again = mpcompile.compile(model, text)  # JSON is YAML
    assert _resolved(again) == _resolved(cm) == _resolved(mpcompile.compile(model, json.loads(text)))
    assert dict(cm.assignments()["conv2"].roles)["grad_output"].quant.sr_bits == 9
    torch.manual_seed(1)
    y = cm(x)
    torch.manual_seed(1)
    assert torch.equal(again(x), y)


def test_graph_views_colour_ops_by_operand_bits(tmp_path):
    torch.manual_seed(0)
    model, x = SmallCNN(), torch.randn(2, 3, 16, 16)
    cm = mpcompile.compile(model, "version: 1\ndefault: {input: fp8_e4m3, weight: mxfp4_e2m1}\n"
                                  "rules:\n  - match: {first: true}\n    input: bf16\n    weight: bf16\n", (x,))
    g = cm.to_networkx()
    assert [g.nodes[n]["bits"] for n in ("conv1", "conv2", "fc", "relu")] == [16, 8, 8, 32]
    assert g.nodes["conv2"]["roles"] == {"input": "fp8_e4m3", "weight": "mxfp4_e2m1"}
    assert set(g.edges) >= {("x", "conv1"), ("conv1", "relu"), ("fc", "add")} and g.number_of_nodes() == 9
    dot = cm.to_dot()
    assert '"conv2" [label="conv2\\nConv2d\\ninput=fp8_e4m3, weight=mxfp4_e2m1", fillcolor="#f6b26b"];' in dot
    assert '"conv1" -> "relu";' in dot
    cm.save_svg(tmp_path / "g.svg")
    svg = ElementTree.parse(tmp_path / "g.svg").getroot()
    rects = svg.findall("{http://www.w3.org/2000/svg}rect")
    assert len(rects) == 9 and {r.get("fill") for r in rects} == {"#d9d9d9", "#9fc5e8", "#f6b26b"}


def test_the_terminal_table_is_coloured_by_operand_bits():
    from rich.console import Console

    cm, _, _ = _compiled()
    console = Console(file=io.StringIO(), force_terminal=True, width=300, color_system="truecolor")
    console.print(mpcompile.views.rich_table(cm))
    out = console.file.getvalue()
    assert "policy 'demo' (<string>), level 0" in out and "fp8_e4m3:channel" in out
    assert "\x1b[48;2;246;178;107m" in out  # the 8-bit rows' background (#f6b26b)
