"""examples/snr_vs_accuracy.py end to end on its smallest setting: logreg, one epoch, four
recipes, one seed; the tables name every recipe and give each metric a rank correlation."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_small_study_writes_its_tables_and_plot(tmp_path):
    recipes = ["bf16", "fp16", "fp8_e4m3", "mxfp4"]
    done = subprocess.run([sys.executable, str(ROOT / "examples/snr_vs_accuracy.py"), "--model", "logreg",
                           "--epochs", "1", "--seeds", "0", "--every", "5", "--recipes", *recipes,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "metrics.md").read_text()
    for recipe in recipes:
        assert f"| {recipe} |" in text
    assert "| sqnr input |" in text and "| sqnr weight |" in text
    assert (tmp_path / "metrics_snr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
