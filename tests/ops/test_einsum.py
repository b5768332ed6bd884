"""ops.einsum: two-operand einsum as one emulated matmul (mpcompile/ops/einsum.py), and its
lowering from torch.einsum."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import mpcompile
from mpcompile import ops
from mpcompile.ops.einsum import einsum_plan
from lowered import check_low_precision_run, ops_called

EQUATIONS = [  # equation, shapes: batch, free, contracted indices in several orders and counts
    ("bij,bjk->bik", (2, 3, 4), (2, 4, 5)), ("bhqd,bhkd->bhqk", (2, 3, 4, 5), (2, 3, 6, 5)),
    ("ij,jk", (3, 4), (4, 5)), ("i,i->", (7,), (7,)), ("i,j->ij", (3,), (4,)),
    ("ijk,jkl->il", (2, 3, 4), (3, 4, 5)), ("bqd,kd->bkq", (2, 3, 4), (5, 4)),
    ("bij,bjk->bik", (1, 3, 4), (2, 4, 5)), ("Ab,bC->CA", (3, 4), (4, 2)),
]


@pytest.mark.parametrize("equation, sa, sb", EQUATIONS)
def test_einsum_is_torchs_in_fp32_and_one_emulated_matmul_of_the_laid_out_operands(equation, sa, sb):
    torch.manual_seed(0)
    a, b = torch.randn(sa), torch.randn(sb)
    torch.testing.assert_close(ops.einsum(equation, a, b), torch.einsum(equation, a, b), rtol=1e-6, atol=1e-6)
    formats, spec = {"input": "fp8_e4m3", "weight": "e3m2", "output": "bf16"}, "acc=e5m7 order=chunk(4)"
    got = ops.einsum(equation, a, b, formats=formats, forward=spec)
    p = einsum_plan(equation)
    sizes = {c: n for t, term in ((a, p.a), (b, p.b)) for c, n in zip(term, t.shape) if n > 1}
    size = lambda part: int(torch.tensor([sizes.get(c, 1) for c in part]).prod())
    # the layout by hand: (batch, left, contracted) @ (batch, contracted, right), contracted in a's order
    shape = lambda parts: [sizes.get(c, 1) for c in "".join(parts)]
    left = torch.einsum(f"{p.a}->{p.batch}{p.left}{p.contracted}", a).expand(shape((p.batch, p.left, p.contracted)))
    right = torch.einsum(f"{p.b}->{p.batch}{p.contracted}{p.right}", b).expand(shape((p.batch, p.contracted, p.right)))
    want = ops.matmul(left.reshape(size(p.batch), size(p.left), size(p.contracted)),
                      right.reshape(size(p.batch), size(p.contracted), size(p.right)), formats=formats,
                      forward=spec)
    want = torch.einsum(f"{p.batch}{p.left}{p.right}->{p.out}", want.reshape(shape((p.batch, p.left, p.right))))
    assert torch.equal(got, want)


@pytest.mark.parametrize("equation", ["ii->i", "ij,jk,kl->il", "...ij,...jk->...ik", "ij,jk->", "ij->ji", "ij,jj->i"])
def test_what_is_not_a_matrix_product_of_two_operands_is_refused(equation):
    assert einsum_plan(equation) is None
    with pytest.raises(ValueError, match="is not a matrix product of two operands"):
        ops.einsum(equation, torch.ones(2, 2), torch.ones(2, 2))


def test_mismatched_operands_are_refused():
    with pytest.raises(ValueError, match=r"indexes 3 and 3 dims, but the operands have 2 and 3"):
        ops.einsum("bij,bjk->bik", torch.ones(3, 4), torch.ones(2, 4, 5))
    with pytest.raises(ValueError, match=r"index 'j' has sizes 4 and 3"):
        ops.einsum("bij,bjk->bik", torch.ones(2, 3, 4), torch.ones(2, 3, 5))


class EinsumAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.mix = nn.Parameter(torch.randn(3, 3, 3))

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).unbind(2)  # (batch, tokens, heads, dim)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", scores, v).flatten(2)
        return out + torch.einsum("ij,jk,kl->il", self.mix[0], self.mix[1], self.mix[2]).sum()


def test_compile_lowers_two_operand_einsums_and_warns_of_the_others():
    torch.manual_seed(0)
    model, x = EinsumAttention(), torch.randn(2, 5, 8)
    policy = "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3, forward: {acc: bf16}, recompute: {tau: 100}}\n"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cm = mpcompile.compile(model, policy, (x,))
    assert list(cm.assignments()) == ["qkv", "einsum", "einsum_1"]
    assert [str(w.message) for w in record] == [
        "mpcompile: node einsum_2 (einsum 'einsum_2'): runs in fp32: einsum 'ij,jk,kl->il' is not emulated: only two "
        "operands whose product is a matrix product, so the policy's input, weight, forward arithmetic for it are "
        "not applied; a rule that matches it with keep: fp32 says that this is intended"]
    assert ops_called(cm) == [ops.linear, ops.einsum, ops.einsum]
    check_low_precision_run(cm, model, (x,))
    traced = {n.name: n.meta["mpc"] for n in cm.annotated.graph.nodes}
    assert traced["einsum"].kappa.median >= 1  # |q||k| / |q k| per score
    assert set(traced["einsum_1"].stats) >= {"input", "weight"} and traced["einsum_1"].sqnr_db is not None
    assert cm.low_precision_counts()["einsum"][1] == 2 * 5 * 2 * 5  # every score, recomputed or not
