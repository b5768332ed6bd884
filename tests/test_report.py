"""`mpcompile report RUN`: one self-contained report.html and its PNGs, from a synthetic run folder
written to the monitor's format (Infinity, NaN and null included), opened once in headless Chromium."""
from __future__ import annotations

import base64
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from mpcompile.cli import main
from mpcompile.errors import MpcompileError
from mpcompile.report import exponent_shares, group_layers, read_records, write_report

CHROMIUM = Path("/usr/bin/chromium")
OPS = {"conv1": "conv1", "layer1_0_conv1": "layer1.0.conv1", "fc": "fc"}
E4M3 = {"format": "fp8_e4m3", "min_subnormal": 2.0**-9, "min_normal": 2.0**-6, "max": 448.0}
BF16 = {"format": "bf16", "min_subnormal": 2.0**-133, "min_normal": 2.0**-126, "max": 3.3895313892515355e38}
FP32 = {"format": "fp32", "min_subnormal": 2.0**-149, "min_normal": 2.0**-126, "max": 3.4028234663852886e38}


def _record(step: int, op: str, role: str, fmt: dict, **kw) -> dict:
    hist_lo = -12 + step % 3
    return {"step": step, "epoch": 1 + step // 10, "op": op, "module": OPS[op], "role": role, **fmt, "count": 1000,
            "zero": 0.01, "overflow": 0.0, "underflow": 0.002, "subnormal": 0.01, "sqnr_db": 30.0 + step / 10,
            "stagnation": None, "hist_lo": hist_lo, "hist": [1, 0, 5, 40, 200, 400, 250, 80, 10, 4], **kw}


def _run(path: Path) -> Path:
    """A run folder: three ops monitored every 5 steps, conv1 kept fp32 (exact SQNR), fc's
    output overflowing, its input raised from fp8 to bf16 at step 20, weights with stagnation, a NaN
    and a null SQNR."""
    rows = []
    for step in range(0, 40, 5):
        rows += [_record(step, "conv1", "input", FP32, sqnr_db=math.inf),
                 _record(step, "conv1", "weight", FP32, sqnr_db=math.inf, stagnation=0.0)]
        for op in ("layer1_0_conv1", "fc"):
            rows += [_record(step, op, "input", BF16 if op == "fc" and step >= 20 else E4M3),
                     _record(step, op, "weight", E4M3, stagnation=0.1 * step / 40),
                     _record(step, op, "grad_output", E4M3 | {"format": "fp8_e5m2"}, sqnr_db=None)]
        rows.append(_record(step, "fc", "output", E4M3, overflow=0.05, sqnr_db=math.nan, hist_lo=5))
    path.mkdir()
    (path / "monitor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # Infinity / NaN tokens
    (path / "summary.json").write_text(json.dumps({"model": "resnet20", "policy": "hfp8", "test_accuracy": 0.91}))
    categories = {"parameters": {"nominal": 1 << 20, "held": 1 << 20, "fp32": 4 << 20},
                  "activations": {"nominal": 3 << 20, "held": 5 << 20, "fp32": 12 << 20}}
    (path / "memory.json").write_text(json.dumps({"batch_size": 32, "categories": categories, "peak": 9 << 20,
                                                  "measured_with": "MemTracker"}))  # MemoryReport.to_dict
    return path


def test_exponent_shares_align_bins_across_steps(tmp_path):
    rows = [_record(0, "fc", "input", E4M3, hist_lo=-3, hist=[1, 0, 3]),
            _record(5, "fc", "input", E4M3, hist_lo=-1, hist=[0, 2, 2]),
            _record(10, "fc", "input", E4M3, hist_lo=0, hist=[])]
    (tmp_path / "monitor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (layer,) = group_layers(read_records(tmp_path / "monitor.jsonl"))
    exponents, shares = exponent_shares(layer.roles["input"])
    assert exponents.tolist() == [-3, -2, -1, 0, 1]
    np.testing.assert_array_equal(shares, [[0.25, 0, 0], [0, 0, 0], [0.75, 0, 0], [0, 0.5, 0], [0, 0.5, 0]])


def test_report_holds_every_op_its_figures_and_the_memory_table(tmp_path, capsys):
    run = _run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    page = run / "report.html"
    assert capsys.readouterr().out.strip() == str(page)
    text = page.read_text()
    for op, module in OPS.items():
        assert f'<a href="#op-{op}">{op}</a>' in text and f">{module}</td>" in text
        for kind in ("exponents", "shares"):
            png = (run / "report" / f"{op}.{kind}.png").read_bytes()
            assert base64.b64encode(png).decode() in text  # embedded, and saved beside the page
            assert imread(run / "report" / f"{op}.{kind}.png").shape[2] == 4  # decodes: RGBA
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', text)) == 2 * len(OPS)
    assert not re.search(r"<script|https?://", text)  # nothing to fetch, nothing to run
    assert "<td>exact</td>" in text and '<td class="bad">5 %</td>' in text  # conv1's fp32 SQNR, fc's output
    assert "<td>fp8_e4m3 → bf16</td>" in text  # a format that changed during training
    assert "<td>fp8_e5m2</td>" in text and "<td>8.75 %</td>" in text  # grad_output's format; weight stagnation
    assert "<td>activations</td><td>3.00 MiB</td><td>5.00 MiB</td><td>12.00 MiB</td><td>0.417</td>" in text
    assert "<td>total</td><td>4.00 MiB</td><td>6.00 MiB</td><td>16.00 MiB</td><td>0.375</td>" in text
    assert "batch size 32, peak held during the step 9.00 MiB, measured with MemTracker" in text
    assert "<th>test_accuracy</th><td>0.91</td>" in text


def test_a_run_without_monitor_records_says_how_to_get_them(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    with pytest.raises(MpcompileError, match=r"no monitor.jsonl.*`mpcompile train \.\.\. --monitor`"):
        write_report(tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 2
    assert "--monitor" in capsys.readouterr().err
    (tmp_path / "run" / "monitor.jsonl").write_text('{"step": 0, "op": "fc"}\n')
    with pytest.raises(MpcompileError, match=r"monitor.jsonl:1: the record has no epoch, module, role"):
        write_report(tmp_path / "run")


def test_the_page_opens_from_disk_in_headless_chromium(tmp_path):
    assert CHROMIUM.exists(), ("this test opens the report in a real browser: install Debian's Chromium with "
                               "`apt-get install -y chromium` (.ci/run does it in CI)")
    page = write_report(_run(tmp_path / "run"))
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    for op in OPS:
        assert f'<a href="#op-{op}">{op}</a>' in dom and f'id="op-{op}"' in dom
    assert dom.count('src="data:image/png;base64,') == 2 * len(OPS)
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    rgb = imread(shot)[..., :3]
    saturated = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.3  # the page's own colours are greys and a pale red
    assert saturated.mean() > 0.01, f"the screenshot shows no figures ({saturated.mean():.2%} coloured pixels)"
