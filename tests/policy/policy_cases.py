"""Policies and ops the tests of mpcompile/policy/ share (imported as ``policy_cases``, like
tests/lowered.py): the design document's example and four ops of a small ResNet-like model."""
from __future__ import annotations

from mpcompile.policy import NodeFacts

__all__ = ["DESIGN_EXAMPLE", "CONV1", "BLOCK", "FC", "RELU", "roles"]

DESIGN_EXAMPLE = """\
version: 1
name: hfp8
formats: {acc16: e6m9}
default:
  rounding: nearest
  input: fp8_e4m3
  weight: fp8_e4m3
  grad_output: fp8_e5m2
  forward:  {acc: acc16, order: chunk(32)}
  backward: {acc: acc16, order: chunk(32)}
rules:
  - match: {first: true}
    keep: fp32
  - match: {type: activation}
    output: bf16
levels:
  - {name: fp8}
  - {name: bf16, set: {input: bf16, weight: bf16, grad_output: bf16}}
  - {name: fp32, keep: fp32}
trust_region: {eta1: 0.25, eta2: 0.75, delta0: 0.1, checks_per_epoch: 50, epsilon: measured}
optimizer: {master: fp32, momentum: bf16, update_rounding: stochastic}
"""
CONV1 = NodeFacts("Conv2d", "conv1", "gemm", 0, 3)
BLOCK = NodeFacts("Conv2d", "layer1.0.conv2", "gemm", 1, 3)
FC = NodeFacts("Linear", "fc", "gemm", 2, 3)
RELU = NodeFacts("ReLU", "layer1.0.relu", "activation")


def roles(assignment) -> dict[str, str | None]:
    return {r: None if s.quant is None else str(s.quant) for r, s in assignment.roles}
