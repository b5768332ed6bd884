"""The pass lists and the pass manager (mpcompile/passes/pipeline.py, manager.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mpcompile
from mpcompile.passes.manager import Pass, check_order
from mpcompile.passes.pipeline import ASSIGN, COMPILE, LOWER, RECOMPILE


def test_each_list_reads_only_what_an_earlier_pass_writes():
    names = [p.name for p in COMPILE]
    assert names == ["capture", "shape", "classify", "coverage", "condition", "assign", "lower", "stats"]
    assert [p.name for p in RECOMPILE] == ["assign", "lower"]
    with pytest.raises(ValueError, match="pass lower reads .*assignment"):
        check_order((Pass("classify", print, writes=("kind", "group", "roles", "dtype")), LOWER, ASSIGN))


def test_views_run_no_pass():
    model, x = nn.Sequential(nn.Linear(4, 4)), torch.randn(2, 4)
    cm = mpcompile.compile(model, "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n", (x,))
    meta = cm.annotated.graph.find_nodes(op="call_module", target="0")[0].meta["mpc"]
    assert meta.sqnr_db is not None and meta.kappa is not None
    cm.recompile(level=0)
    assert meta.sqnr_db is None and meta.kappa is not None  # analysis is kept; stats measured the old assignment
    cm.table(), cm.explain("0"), cm.to_json(), cm.to_dot()
    assert meta.sqnr_db is None
    cm.collect_stats()
    assert meta.sqnr_db is not None


def test_analysed_is_the_deprecated_spelling_of_annotated():
    cm = mpcompile.compile(nn.Sequential(nn.Linear(4, 4)), "fp32", (torch.randn(2, 4),))
    with pytest.warns(DeprecationWarning, match="CompiledModel.annotated"):
        assert cm.analysed() is cm.annotated
