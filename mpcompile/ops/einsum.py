"""``torch.einsum`` of two operands as one emulated ``matmul``.

An equation whose every index is a batch index (in both operands and the output), a contracted
one (both operands, not the output) or a free one (one operand and the output) is a batched
matrix product: the first operand laid out as (batch, its free indices, contracted), the second
as (batch, contracted, its free indices), the product put back in the output's order. The
contracted indices are summed as one k axis, flattened in the order the first operand lists
them: the order in which the arithmetic's sums run. Roles: ``input`` the first operand,
``weight`` the second (as laid out), as ``matmul``.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from .api import Formats, High, Spec, fx_leaf, matmul, renamed_spec

__all__ = ["EinsumPlan", "einsum_plan", "einsum"]


@dataclass(frozen=True)
class EinsumPlan:
    """A two-operand equation's indices by part: ``a``, ``b``, ``out`` as written (``out`` made
    explicit), and the batch, left free, contracted and right free indices in layout order."""

    a: str
    b: str
    out: str
    batch: str
    left: str
    contracted: str
    right: str


def einsum_plan(equation: str) -> EinsumPlan | None:
    """The matmul layout of ``equation``; None if it is not a batched matrix product (not two
    operands, an ellipsis, an index repeated in one term, an index summed within one operand)."""
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != 2 or "." in lhs + out or not (lhs.replace(",", "") + out).isalpha():
        return None
    a, b = terms
    if not arrow:  # implicit output: the indices that appear once, in alphabetical order (as torch)
        counts = Counter(a + b)
        out = "".join(sorted(c for c in counts if counts[c] == 1))
    if any(len(set(t)) != len(t) for t in (a, b, out)) or not set(out) <= set(a + b) \
            or (set(a) ^ set(b)) - set(out):
        return None
    return EinsumPlan(a, b, out, batch="".join(c for c in a if c in b and c in out),
                      left="".join(c for c in a if c not in b), contracted="".join(c for c in a if c in b and c not in out),
                      right="".join(c for c in b if c not in a))


def _laid_out(t: torch.Tensor, term: str, parts: tuple[str, ...], sizes: dict[str, int]) -> torch.Tensor:
    """``t`` (indexed by ``term``) permuted to the order of ``parts``, size-1 dims broadcast, one dim per part."""
    order = "".join(parts)
    t = t.permute([term.index(c) for c in order]).expand([sizes[c] for c in order])
    return t.reshape([math.prod(sizes[c] for c in part) for part in parts])


@fx_leaf
def einsum(equation: str, a: torch.Tensor, b: torch.Tensor, *, formats: Formats = None, forward: Spec = None,
           backward: Spec = None, seed: int | None = None, amax_history: torch.Tensor | None = None,
           recompute: High = None, activation: str | None = None, counts: torch.Tensor | None = None,
           backend: str = "auto", spec: Spec = None) -> torch.Tensor:
    """``torch.einsum(equation, a, b)`` with emulated arithmetic, as one batched ``matmul``.

    Args:
        equation: a two-operand equation that ``einsum_plan`` lays out as a matrix product.
        a, b: the operands (roles ``input`` and ``weight``); size-1 dims broadcast, as in torch.
        formats, forward, backward, seed, amax_history, recompute, activation, counts, backend:
            as ``matmul``'s, for the one product.
        spec: deprecated: the old name of ``forward``; warns.
    """
    forward = renamed_spec("einsum", forward, spec)
    plan = einsum_plan(equation)
    if plan is None:
        raise ValueError(f"mpcompile.ops.einsum: {equation!r} is not a matrix product of two operands (each index "
                         f"a batch, contracted or free one, none repeated in a term, no ellipsis)")
    if a.dim() != len(plan.a) or b.dim() != len(plan.b):
        raise ValueError(f"mpcompile.ops.einsum: {equation!r} indexes {len(plan.a)} and {len(plan.b)} dims, but the "
                         f"operands have {a.dim()} and {b.dim()}")
    sizes: dict[str, int] = {}
    for t, term in ((a, plan.a), (b, plan.b)):
        for c, n in zip(term, t.shape):
            if sizes.get(c, 1) not in (1, n) and n != 1:
                raise ValueError(f"mpcompile.ops.einsum: {equation!r}: index {c!r} has sizes {sizes[c]} and {n}")
            sizes[c] = max(sizes.get(c, 1), n)
    product = matmul(_laid_out(a, plan.a, (plan.batch, plan.left, plan.contracted), sizes),
                     _laid_out(b, plan.b, (plan.batch, plan.contracted, plan.right), sizes), formats=formats,
                     forward=forward, backward=backward, seed=seed, amax_history=amax_history, recompute=recompute,
                     activation=activation, counts=counts, backend=backend)
    order = plan.batch + plan.left + plan.right
    return product.reshape([sizes[c] for c in order]).permute([order.index(c) for c in plan.out])
