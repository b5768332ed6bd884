"""The lock file (mpcompile/policy/lock.py): resolved assignments written back as a policy."""
from __future__ import annotations

import json

from mpcompile.ops.spec import ROLES
from mpcompile.policy import NodeFacts, load_policy, lock_policy

from policy_cases import BLOCK, CONV1, FC, RELU

# every kind of value a lock spells out: a role kept in fp32, a format, a role with sr_bits (its
# string form), products in a format with their own sr_bits, recompute with a finite and an infinite tau
POLICY = """
version: 1
name: every_field
default:
  input: fp8_e4m3
  weight: "fp8_e4m3:channel"
  grad_output: {format: fp8_e5m2, rounding: stochastic, sr_bits: 9}
  forward: {acc: fp16, order: chunk(4)}
  recompute: {tau: 100, forward: {acc: bf16, order: pairwise}}
rules:
  - match: {first: true}
    keep: fp32
  - match: {type: activation}
    output: bf16
  - match: {last: true}
    output: null
    forward: {mul: bf16, acc: fp16, rounding: stochastic, sr_bits: 12, kahan: true}
    backward: {acc: bf16, order: sequential}
    recompute: {tau: inf}
"""


def _resolved(assignment):
    return assignment.roles, assignment.forward, assignment.backward, assignment.recompute


def test_the_lock_spells_out_every_role_and_spec():
    policy = load_policy(POLICY)
    ops = (CONV1, BLOCK, FC, RELU)
    lock = lock_policy([(op.name, policy.resolve(op)) for op in ops], "every_field.lock", "resolved by hand")
    assert list(lock) == ["version", "name", "description", "rules"]
    assert (lock["version"], lock["name"], lock["description"]) == (1, "every_field.lock", "resolved by hand")
    native = {"mul": None, "acc": "fp32", "order": "sequential", "rounding": "nearest", "mul_rounding": "nearest",
              "fma": False, "kahan": False}
    assert lock["rules"][0] == {"match": {"name_regex": "conv1"}, **dict.fromkeys(ROLES),
                                "forward": native, "backward": native}
    block = lock["rules"][1]
    assert list(block) == ["match", "input", "weight", "grad_output", "forward", "backward", "recompute"]
    assert block["match"] == {"name_regex": r"layer1\.0\.conv2"}
    assert (block["input"], block["weight"]) == ("fp8_e4m3", "fp8_e4m3:channel")
    assert block["grad_output"] == "fp8_e5m2:stochastic:sr_bits=9"
    assert block["forward"] == native | {"acc": "fp16", "order": "chunk(4)"} and block["backward"] == native
    assert block["recompute"] == {"tau": 100.0, "forward": native | {"acc": "bf16", "order": "pairwise"}}
    fc = lock["rules"][2]
    assert fc["output"] is None and fc["recompute"] == {"tau": "inf", "forward": native}
    assert fc["forward"] == native | {"mul": "bf16", "acc": "fp16", "rounding": "stochastic",
                                      "mul_rounding": "stochastic", "kahan": True, "sr_bits": 12}
    assert list(fc["forward"])[-1] == "sr_bits"
    assert fc["backward"] == native | {"acc": "bf16"}
    assert lock["rules"][3] == {"match": {"name_regex": r"layer1\.0\.relu"}, "output": "bf16",
                                "forward": native, "backward": native}
    # loaded back (through JSON, which has no inf), it resolves every op as the policy did
    again = load_policy(json.loads(json.dumps(lock)))
    for op in ops:
        assert _resolved(again.resolve(op)) == _resolved(policy.resolve(op)), op.name
    other = NodeFacts("Linear", "fcx", "gemm", 3, 4)  # an exact name: no other op matches
    assert again.resolve(other).matched == ()
