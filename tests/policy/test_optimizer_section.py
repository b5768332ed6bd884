"""The optimizer section: kinds and their keys, each mistake located, and the kinds built."""
from __future__ import annotations

import pytest
import torch

from mpcompile.errors import MpcompileError, PolicyError
from mpcompile.policy import OptimizerSettings, Period, load_policy
from mpcompile.policy.lock import runtime_sections
from mpcompile.runtime.optim import HALP, LPSVRG, SVRG, SWALP, LowPrecisionOptimizer, make_optimizer


def _load(tmp_path, body: str):
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\noptimizer:\n" + body)
    return load_policy(str(path))


@pytest.mark.parametrize("body, where, says", [
    ("  kind: halp\n  mu: 1\n  bits: 1\n", "p.yaml:5:9", "bits must be 2..32"),
    ("  kind: halp\n  mu: 0\n", "p.yaml:4:7", "mu must be positive"),
    ("  kind: halp\n  mu: -1\n", "p.yaml:4:7", "mu must be positive"),
    ("  kind: svrg\n  T: 0 epochs\n", "p.yaml:4:6", "must be positive"),
    ("  kind: svrg\n  T: 3\n", "p.yaml:4:6", "'2 epochs' or '500 steps'"),
    ("  kind: halp\n", "p.yaml:3:3", "needs mu"),
    ("  kind: lpsvrg\n", "p.yaml:3:3", "set optimizer.master"),
    ("  mu: 1\n", "p.yaml:3:7", "add 'kind: halp'"),
    ("  kind: sgd\n  swa_start: 1 epoch\n", "p.yaml:4:14", "not read by kind sgd"),
    ("  kind: svrg\n  update_rounding: stochastic\n", "p.yaml:4:20", "not read by kind svrg"),
    ("  kind: halp\n  mu: 1\n  master: bf16\n", "p.yaml:5:11", "not read by kind halp"),
    ("  kind: sgdd\n", "p.yaml:3:9", "not one of"),
    ("  kind: adam\n  momentum: fp32\n  storage: packed\n", "p.yaml:5:12", "none of them has a format"),
    ("  kind: sgd\n  master: fp32\n  storage: packed\n", "p.yaml:5:12", "none of them has a format"),
    ("  kind: sgd\n  master: tf32\n  storage: packed\n", "p.yaml:5:12", r"master \(tf32\)"),
    ("  kind: adam\n  momentum: tf32\n  storage: packed\n", "p.yaml:5:12", r"momentum \(tf32\)"),
    ("  kind: svrg\n  storage: packed\n", "p.yaml:4:12", "not read by kind svrg"),
])
def test_mistakes_are_located(tmp_path, body, where, says):
    with pytest.raises(PolicyError, match=says) as err:
        _load(tmp_path, body)
    assert where in str(err.value)


def test_shipped_policies_and_their_lock_round_trip():
    for name, kind in [("halp8", "halp"), ("lpsvrg8", "lpsvrg"), ("swalp8", "swalp")]:
        policy = load_policy(name)
        assert policy.optimizer.kind == kind
        relocked = load_policy({"version": 1, **runtime_sections(policy.optimizer, None, False)})
        assert relocked.optimizer == policy.optimizer
    halp = load_policy("halp8").optimizer
    assert (halp.mu, halp.bits, halp.T, halp.update_rounding) == (1.0, 8, Period(1, "epochs"), "stochastic")


def test_make_optimizer_builds_each_kind_and_refuses_what_it_cannot_run():
    params = [torch.nn.Parameter(torch.zeros(3))]
    full = lambda: None  # noqa: E731
    built = {kind: make_optimizer(None, params, 0.1, settings, steps_per_epoch=10, full_grad=full)
             for kind, settings in [
                 ("sgd", OptimizerSettings()), ("svrg", OptimizerSettings(kind="svrg", T=Period(2, "steps"))),
                 ("lpsvrg", load_policy("lpsvrg8").optimizer), ("halp", load_policy("halp8").optimizer),
                 ("swalp", load_policy("swalp8").optimizer)]}
    assert isinstance(built["sgd"], LowPrecisionOptimizer)
    assert isinstance(built["svrg"], SVRG) and built["svrg"].T == 2
    assert isinstance(built["lpsvrg"], LPSVRG) and built["lpsvrg"].T == 10
    assert isinstance(built["halp"], HALP) and (built["halp"].mu, built["halp"].bits) == (1.0, 8)
    assert isinstance(built["swalp"], SWALP) and (built["swalp"].start, built["swalp"].every) == (50, 10)
    with pytest.raises(PolicyError, match="needs data for its full gradient"):
        make_optimizer(None, params, 0.1, load_policy("halp8").optimizer, steps_per_epoch=10)
    with pytest.raises(PolicyError, match="give steps_per_epoch"):
        make_optimizer(None, params, 0.1, load_policy("halp8").optimizer, full_grad=full)
    with pytest.raises(MpcompileError, match="is for kind halp, but adam was asked for"):
        make_optimizer("adam", params, 0.1, load_policy("halp8").optimizer, full_grad=full)
    with pytest.raises(PolicyError, match="not read by kind svrg"):
        make_optimizer("svrg", params, 0.1, OptimizerSettings(momentum=load_policy("hfp8").default.roles[0][1]))


def test_codebook_formats_are_read_for_the_states_only(tmp_path):
    body = ("  kind: adamw\n  momentum: blockwise(dynamic8,256)\n  second_moment: q8u\n  storage: packed\n")
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nformats: {q8u: 'blockwise(dynamic8u,256)'}\noptimizer:\n" + body)
    settings = load_policy(str(path)).optimizer
    assert (str(settings.momentum), str(settings.second_moment)) == ("blockwise(dynamic8,256)", "blockwise(dynamic8u,256)")
    assert load_policy({"version": 1, **runtime_sections(settings, None, False)}).optimizer == settings
    for text, where, says in [
        ("optimizer:\n  kind: adam\n  momentum: blockwise(dynamic8u,256)\n", "p.yaml:4:13", "unsigned, but momentum"),
        ("optimizer:\n  kind: adam\n  master: blockwise(dynamic8,256)\n", "p.yaml:4:11", "for the optimizer's states only"),
        ("optimizer:\n  kind: adam\n  second_moment: blockwise(dynamic4u,256)\n  update_rounding: stochastic\n",
         "p.yaml:5:20", r"second_moment \(blockwise\(dynamic4u,256\)\) rounds to the nearest"),
        ("default:\n  weight: blockwise(dynamic8,256)\n", "p.yaml:3:11", "default.weight: blockwise"),
        ("default:\n  forward: {acc: 'blockwise(dynamic8,256)'}\n", "p.yaml:3:18", "default.forward.acc: blockwise"),
    ]:
        path.write_text("version: 1\n" + text)
        with pytest.raises(PolicyError, match=says) as err:
            load_policy(str(path))
        assert where in str(err.value)
