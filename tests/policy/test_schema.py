"""The policy schema (mpcompile/policy/schema.py): defaults, derived properties, and the package's
one-idea-per-file layout (schema imports none of its siblings; no private name crosses a file)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import mpcompile.policy as policy_package
from mpcompile.formats import parse
from mpcompile.policy import (NodeFacts, OptimizerSettings, Selector, Settings, TrustRegionSettings, load_policy,
                              resolve)

from policy_cases import BLOCK, CONV1, DESIGN_EXAMPLE, FC, RELU

PACKAGE = Path(policy_package.__file__).parent


def test_sections_left_out_take_their_defaults():
    p = load_policy("version: 1\n")
    assert (p.name, p.description, p.default, p.rules, p.levels) == ("<string>", "", Settings(), (), ())
    assert p.trust_region is None and p.optimizer == OptimizerSettings()
    assert load_policy("version: 1\ntrust_region: {}\n").trust_region == TrustRegionSettings()
    assert p.level_index(0) == 0  # a policy without levels is its own level 0


def test_keep_fp32_and_what_an_assignment_rounds():
    p = load_policy(DESIGN_EXAMPLE)
    assert p.rules[0].settings.keeps_fp32 and p.levels[2].settings.keeps_fp32
    assert not Settings().keeps_fp32 and not p.default.keeps_fp32
    fc, first = p.resolve(FC), p.resolve(CONV1)
    assert fc.quantizes and fc.unit_roundoff == parse("fp8_e4m3").unit_roundoff == 2.0 ** -4
    assert not first.quantizes and first.unit_roundoff == 0.0
    # the forward arithmetic counts: e6m9 sums with fp32 operands
    wide = load_policy("version: 1\ndefault: {forward: {acc: e6m9}}\n").resolve(FC)
    assert wide.quantizes and wide.unit_roundoff == 2.0 ** -10


def test_the_methods_are_the_cascade():
    p = load_policy(DESIGN_EXAMPLE)
    for op in (CONV1, BLOCK, FC, RELU):
        for level in (0, "bf16", 2):
            assert p.resolve(op, level) == resolve(p, op, level)
    selector = Selector(type=("gemm",), first=False)
    assert [selector.matches(op) for op in (CONV1, BLOCK, FC, RELU)] == [False, True, True, False]
    assert not Selector(kappa_above=10.0).matches(NodeFacts("Linear", "fc", "gemm", 0, 1))  # no estimate


def test_every_file_has_a_docstring_and_all_and_no_private_import():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__", "cascade", "lock", "parse", "schema"]
    for stem in modules:
        tree = ast.parse((PACKAGE / f"{stem}.py").read_text())
        assert ast.get_docstring(tree), stem
        module = importlib.import_module("mpcompile.policy" + ("" if stem == "__init__" else f".{stem}"))
        assert all(hasattr(module, name) for name in module.__all__), stem
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{stem} imports {private} from {node.module}"
                if stem == "schema" and node.level == 1 and node.col_offset == 0:
                    raise AssertionError(f"schema imports .{node.module} at module level: the siblings import it")
    assert set(policy_package.__all__) >= {"SCHEMA_VERSION", "GROUPS", "SHIPPED_POLICIES", "RoleSetting", "Settings",
                                           "Selector", "Rule", "Level", "Policy", "NodeFacts", "Assignment",
                                           "OptimizerSettings", "TrustRegionSettings", "load_policy",
                                           "shipped_policies", "lock_policy"}
    assert policy_package.SHIPPED_POLICIES == PACKAGE.parent / "policies"
