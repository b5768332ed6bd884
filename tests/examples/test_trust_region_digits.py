"""examples/trust_region_digits.py end to end on one epoch: every run is in the table, the
trust-region row's iterations per level add up to the epoch, and the figures are written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_trust_region_results_page(tmp_path):
    doc = tmp_path / "results" / "t.md"
    subprocess.run([sys.executable, str(ROOT / "examples" / "trust_region_digits.py"), "--epochs", "1", "--seeds", "0",
                    "--runs", str(tmp_path / "runs"), "--doc", str(doc)], check=True, capture_output=True, cwd=ROOT)
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[2:-1]]
            for line in doc.read_text().splitlines() if line.startswith("| `")}
    assert list(rows) == ["trust_region", "fp8_e4m3 fixed", "bf16 fixed", "fp32 cosine"]
    assert sum(int(n) for n in rows["trust_region"][3].split(" / ")) == 22  # 1347 images in batches of 64
    assert rows["fp32 cosine"][3] == "-"
    for png in ("t.png", "t_trajectory.png"):
        assert (doc.parent / png).read_bytes()[:4] == b"\x89PNG"
