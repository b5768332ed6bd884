"""examples/recipes_digits.py end to end on one short epoch: the table has its columns and the
underflow / overflow shares come from the roles each policy rounds."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_recipes_table_reports_underflow_and_overflow(tmp_path):
    doc = tmp_path / "r.md"
    subprocess.run([sys.executable, str(ROOT / "examples" / "recipes_digits.py"), "--epochs", "1", "--seeds", "0",
                    "--policies", "fp32,mxfp4", "--runs", str(tmp_path / "runs"), "--doc", str(doc)],
                   check=True, capture_output=True, cwd=ROOT)
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[2:-1]]
            for line in doc.read_text().splitlines() if line.startswith("| `")}
    assert rows["fp32"][4:6] == ["- / -", "- / -"]  # fp32 rounds nothing
    mx = json.loads((tmp_path / "runs" / "mxfp4-seed0" / "recipe.json").read_text())["range_losses"]
    # E2M1 elements in blocks of 32 for every GEMM operand: one mantissa bit, many values round to zero
    assert mx["forward"]["values"] > 0 and mx["gradient"]["values"] > 0
    assert 0 < mx["gradient"]["underflow"] < mx["gradient"]["values"] and mx["forward"]["underflow"] > 0
    assert mx["forward"]["overflow"] == mx["gradient"]["overflow"] == 0  # each block is scaled to fit
    shares = rows["mxfp4"][4].split(" / ")
    assert float(shares[1]) == float(f"{100 * mx['gradient']['underflow'] / mx['gradient']['values']:.2g}")
