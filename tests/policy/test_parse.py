"""Reading policies (mpcompile/policy/parse.py): YAML, files, mappings and shipped names; errors with
file:line:column."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mpcompile.errors import PolicyError
from mpcompile.formats import parse
from mpcompile.ops import ArithSpec
from mpcompile.policy import load_policy

from policy_cases import BLOCK, DESIGN_EXAMPLE, FC, roles


def test_rounding_and_saturate_are_defaults_for_what_is_below():
    p = load_policy("""
version: 1
rounding: stochastic
saturate: true
formats: {e4: fp8_e4m3}
default:
  input: e4
  weight: e4:nearest:channel
  grad_output: {format: fp8_e5m2, rounding: down, saturate: false, sr_bits: 12, scaling: tensor}
  forward: {mul: e4, acc: fp16}
rules:
  - match: {type: Linear}
    rounding: up
    output: bf16
    backward: {acc: bf16, rounding: nearest}
""")
    a = dict(p.resolve(FC).roles)
    assert str(a["input"].quant) == "fp8_e4m3:stochastic:sat"
    assert str(a["weight"].quant) == "fp8_e4m3:channel:sat"
    assert str(a["grad_output"].quant) == "fp8_e5m2:down:tensor:sr_bits=12" and a["grad_output"].quant.sr_bits == 12
    assert str(a["output"].quant) == "bf16:up:sat"
    fc = p.resolve(FC)
    assert fc.forward == ArithSpec(mul="fp8_e4m3", acc="fp16", rounding="stochastic")
    assert fc.backward == ArithSpec(acc="bf16")


def test_sources(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text(DESIGN_EXAMPLE)
    from_file = load_policy(path)
    assert from_file.source == str(path) and load_policy(str(path)).resolve(FC) == from_file.resolve(FC)
    assert load_policy(from_file) is from_file
    as_dict = load_policy({"version": 1, "default": {"input": "bf16"}, "rules": [{"match": {"last": True}, "keep": "fp32"}]})
    assert roles(as_dict.resolve(BLOCK)) == {"input": "bf16"} and roles(as_dict.resolve(FC))["input"] is None
    with pytest.raises(PolicyError, match=r"(?s)<dict>\.rules\[0\]\.match\.frist: unknown key 'frist'.*did you mean 'first'"):
        load_policy({"version": 1, "rules": [{"match": {"frist": True}, "keep": "fp32"}]})
    with pytest.raises(PolicyError, match=r"mien\.yaml: no such policy file; did you mean 'mine\.yaml'"):
        load_policy(tmp_path / "mien.yaml")
    lock = tmp_path / "mine.lock.json"  # a lock file is JSON, which is YAML: a path string reads the file
    lock.write_text(json.dumps({"version": 1, "strict": True, "default": {"input": "bf16"}}))
    assert load_policy(str(lock)).source == str(lock) and load_policy(str(lock)).strict
    assert not from_file.strict
    with pytest.raises(PolicyError, match=r"mien\.lock\.json: no such policy file; did you mean 'mine\.lock\.json'"):
        load_policy(str(tmp_path / "mien.lock.json"))


# (policy text, line, column, what the message says): every one must fail at that place
MALFORMED = [
    ("name: x\n", 1, 1, "has no 'version'"),
    ("version: 2\n", 1, 10, "schema version 2 is not supported"),
    ("version: one\n", 1, 10, "version must be an integer"),
    ("version: 1\nnmae: x\n", 2, 1, "unknown key 'nmae'.*did you mean 'name'"),
    ("version: 1\ndefault:\n  inptu: bf16\n", 3, 3, "unknown key 'inptu' in default.*did you mean 'input'"),
    ("version: 1\ndefault:\n  input: bf61\n", 3, 10, "default.input: .*bf61"),
    ("version: 1\ndefault:\n  input: bf16:stochastik\n", 3, 10, "'stochastik' is not a rounding.*did you mean 'stochastic'"),
    ("version: 1\ndefault:\n  input: {rounding: up}\n", 3, 10, "default.input needs a 'format'"),
    ("version: 1\ndefault:\n  input: {format: bf16, scaling: tensr}\n", 3, 34, "scaling 'tensr'.*did you mean 'tensor'"),
    ("version: 1\ndefault:\n  input: {format: bf16, sr_bits: 0}\n", 3, 34, r"sr_bits must be in \[1, 32\]"),
    ("version: 1\ndefault:\n  input: {format: bf16, sr_bits: many}\n", 3, 34, "sr_bits must be an integer"),
    ("version: 1\ndefault:\n  input: [bf16]\n", 3, 10, "default.input must be a mapping, got a list"),
    ("version: 1\ndefault:\n  forward: {acc: fp16, oder: chunk(32)}\n", 3, 24, "unknown key 'oder'.*did you mean 'order'"),
    ("version: 1\ndefault:\n  forward: {acc: fp16, order: chunk(0)}\n", 3, 12, "chunk size must be at least 1"),
    ("version: 1\ndefault:\n  forward: {acc: fp16, kahan: yes please}\n", 3, 31, "kahan must be true or false"),
    ("version: 1\ndefault:\n  forward: {acc: 'fixed(8,4)'}\n", 3, 12, "forward: .*acc"),
    ("version: 1\ndefault:\n  forward: {acc: fp16, rounding: round}\n", 3, 34, "rounding 'round' is not one of"),
    ("version: 1\nrounding: nearst\n", 2, 11, "did you mean 'nearest'"),
    ("version: 1\nsaturate: maybe\n", 2, 11, "saturate must be true or false"),
    ("version: 1\nformats: {acc16: e6m99}\n", 2, 18, "formats.acc16"),
    ("version: 1\nformats: {1x: e5m2}\n", 2, 11, "alias '1x' must be a name"),
    ("version: 1\nformats: [e5m2]\n", 2, 10, "formats must be a mapping"),
    ("version: 1\nrules:\n  match: {first: true}\n", 3, 3, "rules must be a list"),
    ("version: 1\nrules:\n  - keep: fp32\n", 3, 5, r"rules\[0\] has no 'match'"),
    ("version: 1\nrules:\n  - match: {typ: Linear}\n    keep: fp32\n", 3, 13, "unknown key 'typ'.*did you mean 'type'"),
    ("version: 1\nrules:\n  - match: {name_regex: 'conv[0-'}\n    keep: fp32\n", 3, 25, "not a valid regular expression"),
    ("version: 1\nrules:\n  - match: {first: 1}\n    keep: fp32\n", 3, 20, "first must be true or false"),
    ("version: 1\nrules:\n  - match: {index: [0, last]}\n    keep: fp32\n", 3, 24, "index must be an integer"),
    ("version: 1\nrules:\n  - match: {kappa_above: 0.5}\n    keep: fp32\n", 3, 26, "must be at least 1"),
    ("version: 1\nrules:\n  - match: {}\n    keep: bf16\n", 4, 11, "keep takes 'fp32'"),
    ("version: 1\nrules:\n  - match: {}\n    keep: fp32\n    input: bf16\n", 5, 5, "contradicts 'keep: fp32'"),
    ("version: 1\nrules:\n  - match: {}\n    outptu: bf16\n", 4, 5, r"unknown key 'outptu' in rules\[0\].*did you mean 'output'"),
    ("version: 1\nlevels:\n  - {name: a, set: {input: bf16}}\n", 3, 15, "level 0 is the policy itself"),
    ("version: 1\nlevels:\n  - {name: a}\n  - {set: {input: bf16}}\n", 4, 5, r"levels\[1\] has no 'name'"),
    ("version: 1\nlevels:\n  - {name: a}\n  - {name: a, keep: fp32}\n", 4, 12, "level name 'a' is used twice"),
    ("version: 1\nlevels:\n  - {name: a}\n  - {name: b, set: {input: bf16}, keep: fp32}\n", 4, 20, "both 'keep' and 'set'"),
    ("version: 1\nlevels:\n  - {name: a}\n  - {name: b, sett: {}}\n", 4, 15, "unknown key 'sett'.*did you mean 'set'"),
    ("version: 1\ndefault:\n  input: bf16\n  input: fp16\n", 4, 3, "'input' is given twice"),
    ("version: 1\ndefault: {input: bf16\n", 3, 1, "not valid YAML"),
    ("version: 1\ntrust_region: fast\n", 2, 15, "trust_region must be a mapping"),
    ("version: 1\ntrust_region: {eta: 0.1, etta1: 0.2}\n", 2, 26, r"unknown key 'etta1'.*did you mean 'eta1'"),
    ("version: 1\ntrust_region: {epsilon: exact}\n", 2, 25, r"trust_region.epsilon 'exact' is not one of measured"),
    ("version: 1\ntrust_region: {method: sgd}\n", 2, 24, "not one of trust_region, mp_sgd"),
    ("version: 1\ntrust_region: {eta1: 0.8}\n", 2, 15, r"eta1 \(0.8\) must not exceed eta2"),
    ("version: 1\ntrust_region: {eta2: 1.5}\n", 2, 22, "eta2 must be below 1"),
    ("version: 1\ntrust_region: {delta0: 0}\n", 2, 24, "delta0 must be positive"),
    ("version: 1\ntrust_region: {checks_per_epoch: 0.5}\n", 2, 34, "checks_per_epoch must be an integer"),
    ("version: 1\ntrust_region: {per_layer: 1}\n", 2, 27, "per_layer must be true or false"),
    ("version: 1\noptimizer: {momentm: bf16}\n", 2, 13, r"unknown key 'momentm' in optimizer.*did you mean 'momentum'"),
    ("version: 1\noptimizer:\n  master: e4m9x\n", 3, 11, "optimizer.master"),
    ("version: 1\noptimizer: {update_rounding: stochastc}\n", 2, 30, "did you mean 'stochastic'"),
    ("version: 1\noptimizer: {weight_decay: -0.1}\n", 2, 27, "weight_decay must be >= 0"),
    ("version: 1\noptimizer: [bf16]\n", 2, 12, "optimizer must be a mapping"),
    ("", None, None, "the policy is empty"),
]


@pytest.mark.parametrize("text, line, column, message", MALFORMED)
def test_malformed_policies_name_the_place(text, line, column, message, tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    where = f"{path}:{line}:{column}: " if line else f"{path}: "
    assert str(err.value).startswith(where), str(err.value)
    assert re.search(message, str(err.value), re.S), str(err.value)
    if line:  # the offending line is quoted with a caret under the column
        src = text.splitlines()[line - 1] if line <= len(text.splitlines()) else ""
        assert f"\n    {src}\n    {' ' * (column - 1)}^" in str(err.value)


def test_the_documented_example_loads():
    doc = (Path(__file__).parents[2] / "docs" / "policy.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    p = load_policy(example)
    assert roles(p.resolve(BLOCK)) == {"input": "fp8_e4m3", "weight": "fp8_e4m3:channel",
                                       "grad_output": "fp8_e5m2:stochastic:sr_bits=12"}
    assert dict(p.resolve(BLOCK).roles)["grad_output"].quant.sr_bits == 12


def test_recompute_keeps_the_section_rounding():
    p = load_policy("version: 1\ndefault:\n  rounding: stochastic\n  recompute: {tau: 5, forward: {acc: fp16}}\n")
    assert p.default.recompute.forward == ArithSpec(acc=parse("fp16"), rounding="stochastic")


RECOMPUTE_MALFORMED = [
    ("version: 1\ndefault:\n  recompute: {tau: -1}\n", 3, 20,
     r"default.recompute.tau must be a positive number or inf, got int -1.*a tau below 1 recomputes them all"),
    ("version: 1\ndefault:\n  recompute: {tau: 0}\n", 3, 20, "tau must be a positive number or inf, got int 0"),
    ("version: 1\ndefault:\n  recompute: {tau: lots}\n", 3, 20, "tau must be a positive number or inf, got str 'lots'"),
    ("version: 1\ndefault:\n  recompute: {tau: .nan}\n", 3, 20, "tau must be a positive number or inf, got float nan"),
    ("version: 1\ndefault:\n  recompute: {tau: true}\n", 3, 20, "got bool True"),
    ("version: 1\ndefault:\n  recompute: {forward: {acc: fp32}}\n", 3, 14, "default.recompute needs a 'tau'"),
    ("version: 1\ndefault:\n  recompute: {tau: 10, tua: 5}\n", 3, 24, r"unknown key 'tua' in default.recompute"),
    ("version: 1\ndefault:\n  recompute: {tau: 10, forward: {acc: fp61}}\n", 3, 39, "default.recompute.forward.acc"),
    ("version: 1\ndefault:\n  recompute: 100\n", 3, 14, "default.recompute must be a mapping, got int 100"),
    ("version: 1\ndefault:\n  recompte: {tau: 10}\n", 3, 3,
     "unknown key 'recompte' in default.*did you mean 'recompute'"),
    ("version: 1\nrules:\n  - match: {type: [activation, pool]}\n    recompute: {tau: 10}\n", 4, 5,
     r"rules\[0\].recompute: recomputing components is for GEMM-like ops .* matches only activation, pool ops"),
    ("version: 1\nrules:\n  - match: {}\n    keep: fp32\n    recompute: {tau: 10}\n", 5, 5, "contradicts 'keep: fp32'"),
    ("version: 1\nlevels:\n  - {name: a}\n  - {name: b, set: {recompute: {tau: -2}}}\n", 4, 38,
     "tau must be a positive"),
]


@pytest.mark.parametrize("text, line, column, message", RECOMPUTE_MALFORMED)
def test_malformed_recompute_names_the_place(text, line, column, message, tmp_path: Path):
    test_malformed_policies_name_the_place(text, line, column, message, tmp_path)
