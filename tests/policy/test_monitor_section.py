"""The monitor section: its keys read as the schema says, each mistake located."""
from __future__ import annotations

import pytest

from mpcompile.errors import PolicyError
from mpcompile.policy import MONITOR_ROLES, MonitorSettings, load_policy


def _load(tmp_path, body: str):
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nmonitor:\n" + body)
    return load_policy(str(path))


def test_keys_read_and_defaults(tmp_path):
    assert load_policy({"version": 1}).monitor is None
    assert _load(tmp_path, "  every: 5\n").monitor == MonitorSettings(every=5, roles=MONITOR_ROLES)
    settings = _load(tmp_path, "  ops: [{type: Linear}, {name: features}]\n  roles: [weight, master]\n"
                               "  histograms: false\n").monitor
    assert [s.type for s in settings.ops] == [("Linear",), ()] and settings.ops[1].name == "features"
    assert (settings.every, settings.roles, settings.histograms) == (50, ("weight", "master"), False)
    assert _load(tmp_path, "  ops: {last: true}\n").monitor.ops[0].last


@pytest.mark.parametrize("body, where, says", [
    ("  every: 0\n", "p.yaml:3:10", "positive number of steps"),
    ("  every: 2.5\n", "p.yaml:3:10", "monitor.every"),
    ("  roles: [weigth]\n", "p.yaml:3:11", "did you mean 'weight'"),
    ("  roles: []\n", "p.yaml:3:10", "is empty"),
    ("  roles: weight\n", "p.yaml:3:10", "must be a list"),
    ("  ops: {typ: Linear}\n", "p.yaml:3:9", "did you mean .type."),
    ("  histograms: 1\n", "p.yaml:3:15", "monitor.histograms"),
    ("  evry: 5\n", "p.yaml:3:3", "evry"),
])
def test_mistakes_are_located(tmp_path, body, where, says):
    with pytest.raises(PolicyError, match=says) as err:
        _load(tmp_path, body)
    assert where in str(err.value)
