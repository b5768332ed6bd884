"""The communication section: its keys read as the schema says, each mistake located."""
from __future__ import annotations

import pytest

from mpcompile.errors import PolicyError
from mpcompile.formats import parse
from mpcompile.policy import CommunicationSettings, load_policy


def _load(tmp_path, body: str):
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\ncommunication:\n" + body)
    return load_policy(str(path))


def test_keys_read_and_defaults(tmp_path):
    assert load_policy({"version": 1}).communication is None
    assert _load(tmp_path, "  format: fp32\n").communication is None  # torch's own all-reduce
    assert _load(tmp_path, "  format: fp8_e5m2\n").communication == CommunicationSettings(format=parse("fp8_e5m2"))
    c = _load(tmp_path, "  format: e4m3\n  scaling: block(32)\n  rounding: stochastic\n  error_feedback: true\n"
                        "  shared_scale: true\n").communication
    assert (c.scaling, c.block_size, c.rounding, c.error_feedback, c.shared_scale) == ("block", 32, "stochastic",
                                                                                        True, True)
    assert _load(tmp_path, "  format: mxfp8_e5m2\n").communication.scaling == "none"  # its own block scales


@pytest.mark.parametrize("body, where, says", [
    ("  format: fp8_e5m3\n", "p.yaml:3:11", "communication.format"),
    ("  format: tf32\n", "p.yaml:3:11", "19 bits"),
    ("  format: fp8_e5m2\n  scaling: block(0)\n", "p.yaml:4:12", "tensor, none, block"),
    ("  format: fp8_e5m2\n  scaling: per_row\n", "p.yaml:4:12", "tensor, none, block"),
    ("  format: mxfp8_e4m3\n  scaling: tensor\n", "p.yaml:4:12", "its own scales"),
    ("  format: mxfp8_e4m3\n  shared_scale: true\n", "p.yaml:4:17", "scales each block"),
    ("  format: fp8_e5m2\n  scaling: none\n  shared_scale: true\n", "p.yaml:5:17", "no scale to share"),
    ("  format: fp8_e5m2\n  rounding: up\n", "p.yaml:4:13", "nearest, stochastic"),
    ("  error_feedback: true\n", "p.yaml:3:3", "travel in fp32"),
    ("  format: bf16\n  errorfeedback: true\n", "p.yaml:4:3", "did you mean 'error_feedback'"),
])
def test_mistakes_are_located(tmp_path, body, where, says):
    with pytest.raises(PolicyError, match=says) as err:
        _load(tmp_path, body)
    assert where in str(err.value)
