"""examples/halp_convex.py and examples/halp_deep.py end to end on their smallest settings: every
method runs, the done-bar lines are printed and the plots are written."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> str:
    return subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True, cwd=ROOT).stdout


def test_convex_quick_run_reports_every_method_and_the_bar(tmp_path):
    out = _run("examples/halp_convex.py", "--quick", "--plots", str(tmp_path))
    for method in ("SGD", "LP-SGD", "SVRG", "LP-SVRG", "HALP"):
        assert re.search(rf"^  {re.escape(method)} +0\.1 ", out, re.M), out
    assert len(re.findall(r"\(bar >= \d+x\): (met|MISSED)", out)) == 3
    assert {p.name for p in tmp_path.glob("*.png")} == {"halp_digits.png", "halp_breast_cancer.png",
                                                         "halp_diabetes.png"}


def test_deep_run_trains_each_method_through_the_trainer(tmp_path):
    plot = tmp_path / "deep.png"
    out = _run("examples/halp_deep.py", "--epochs", "1", "--seeds", "0", "--lrs", "0.1", "--model", "logreg",
               "--runs", str(tmp_path / "runs"), "--plot", str(plot))
    for method in ("SGD", "LP-SGD", "SVRG", "HALP"):
        accuracy = re.search(rf"^{re.escape(method)} +lr 0\.1: .*mean ([\d.]+) %", out, re.M)
        assert accuracy and float(accuracy.group(1)) > 50, out
    assert plot.is_file()
