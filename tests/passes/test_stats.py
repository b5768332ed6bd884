"""The stats pass (mpcompile/passes/stats.py): format shares and SQNR against direct counts."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

import mpcompile
from mpcompile import quantize
from mpcompile.passes.meta import RoleStats


def _stats(cm, name):
    return next(n for n in cm.annotated.graph.nodes if n.name == name).meta["mpc"]


def test_shares_of_overflow_flush_and_subnormal():
    torch.manual_seed(0)
    net = nn.Linear(8, 3)
    # fp8_e4m3: max 448, smallest subnormal 2**-9 (below 2**-10 rounds to 0), smallest normal 2**-6
    x = torch.tensor([[500.0, -1000.0, 2.0**-11, 2.0**-10, 2.0**-7, 0.0, 1.0, -3.0]] * 2)
    cm = mpcompile.compile(net, "version: 1\ndefault: {input: 'fp8_e4m3:sat'}\n", (x,))  # saturated: SQNR stays finite
    s = _stats(cm, "linear")  # a bare Linear traces to F.linear
    assert s.stats["input"] == RoleStats(overflow=2 / 8, flush_to_zero=1 / 8, subnormal=2 / 8)
    y, yq = net(x).double(), cm(x).double()
    assert s.sqnr_db == 10 * math.log10(y.square().sum().item() / (y - yq).square().sum().item())


def test_lossless_formats_have_infinite_sqnr_and_collect_stats_measures_a_recompile():
    torch.manual_seed(0)
    net = nn.Linear(8, 3)
    with torch.no_grad():
        net.weight.copy_(quantize(net.weight, "bf16"))
    x = quantize(torch.randn(4, 8), "bf16")
    cm = mpcompile.compile(net, "version: 1\ndefault: {input: bf16, weight: bf16}\n", (x,))
    s = _stats(cm, "linear")
    assert s.sqnr_db == math.inf and s.stats["weight"].overflow == 0 and cm.stats_current
    fp8 = "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n"
    state = torch.random.get_rng_state()
    cm.recompile(fp8)  # new formats of a calibrated model: measured again
    s = _stats(cm, "linear")
    y, yq = net(x).double(), cm(x).double()
    assert s.sqnr_db == 10 * math.log10(y.square().sum().item() / (y - yq).square().sum().item()) < 40
    assert torch.equal(torch.random.get_rng_state(), state)  # analysis never moves training's random numbers
    cm.collect_stats()
    assert _stats(cm, "linear").sqnr_db == s.sqnr_db


def test_a_recompile_of_an_uncalibrated_model_drops_the_statistics():
    net = nn.Linear(8, 3)
    cm = mpcompile.compile(net, "version: 1\ndefault: {input: bf16, weight: bf16}\n", (torch.randn(4, 8),))
    cm.recompile("version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n")
    assert _stats(cm, "linear").sqnr_db is not None  # calibrated on the example input
    plain = mpcompile.compile(net, "version: 1\ndefault: {input: bf16, weight: bf16}\n", (torch.randn(4, 8),),
                              calibration=[])
    plain.recompile("version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n")
    assert _stats(plain, "linear").stats is None and not plain.stats_current


def test_an_output_that_overflows_has_sqnr_minus_infinity():
    """Unsaturated fp8_e4m3 has no inf: 1000 becomes NaN; e5m2 overflows to inf. The noise is
    then unbounded, and compile must still finish."""
    net = nn.Linear(2, 1)
    x = torch.tensor([[1000.0, 1.0]])
    for policy in ("version: 1\ndefault: {input: fp8_e4m3}\n", "version: 1\ndefault: {output: fp8_e5m2}\n"):
        with torch.no_grad():
            net.weight.fill_(100.0), net.bias.zero_()
        cm = mpcompile.compile(net, policy, (x,))
        assert not torch.isfinite(cm(x)).all()
        assert _stats(cm, "linear").sqnr_db == -math.inf
