"""DecisionTree: scikit-learn's accuracy at fp64, sensible trees in fp16/bf16/fp8, and a split
search whose class counts and impurities really are rounded to the precision."""
from __future__ import annotations

import functools

import pytest
import torch
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split
from sklearn.tree import DecisionTreeClassifier

from mpcompile.sweep.arithmetic import Arithmetic
from mpcompile.sweep.tree import DecisionTree

FP64 = Arithmetic(torch.float64)
FP8 = Arithmetic(torch.float32, "fp8_e4m3")


@functools.cache
def _iris():
    """(x_train, x_test, y_train, y_test) as numpy arrays: the fixed split of the issue."""
    x, y = load_iris(return_X_y=True)
    return train_test_split(x, y, test_size=0.3, random_state=0)


@functools.cache
def _fit(arith: Arithmetic) -> DecisionTree:
    x_train, _, y_train, _ = _iris()
    return DecisionTree(arith).fit(x_train, y_train)


def _conflicts(x: torch.Tensor, y: torch.Tensor) -> int:
    """How many distinct rows of x occur with more than one label: what no tree can fit."""
    rows, group = torch.unique(x, dim=0, return_inverse=True)
    labels_per_row = torch.zeros(len(rows), int(y.max()) + 1).index_put_((group, y), torch.ones(len(y)))
    return int(((labels_per_row > 0).sum(1) > 1).sum())


def test_fp64_is_as_accurate_as_scikit_learn():
    x_train, x_test, y_train, y_test = _iris()
    reference = DecisionTreeClassifier(random_state=0).fit(x_train, y_train).score(x_test, y_test)
    assert abs(_fit(FP64).score(x_test, y_test) - reference) <= 0.02  # both 44/45 here


def test_fully_grown_fp64_tree_fits_the_training_set():
    x_train, _, y_train, _ = _iris()
    assert _conflicts(torch.tensor(x_train), torch.tensor(y_train)) == 0
    assert _fit(FP64).score(x_train, y_train) == 1.0


@pytest.mark.parametrize("arith", [Arithmetic(torch.float16), Arithmetic(torch.bfloat16)], ids=str)
def test_fp16_and_bf16_grow_the_fp64_tree(arith):
    """Iris has one decimal and values under 8: fp16 and bf16 (spacing <= 1/32 there) keep every
    distinct value distinct and in order, and class counts <= 105 are exact in both, so the
    rounded impurities pick the fp64 splits here (thresholds differ: midpoints round)."""
    x_train, x_test, y_train, y_test = _iris()
    tree, exact = _fit(arith), _fit(FP64)
    assert torch.equal(tree.nodes.feature, exact.nodes.feature)
    assert torch.equal(tree.predict(x_test), exact.predict(x_test))
    assert tree.score(x_test, y_test) > 0.95
    assert tree.nodes.threshold.dtype == arith.dtype


@pytest.mark.parametrize("native,emulated", [(torch.float16, "fp16"), (torch.bfloat16, "bf16")])
def test_emulated_tree_equals_native_tree_to_the_bit(native, emulated):
    tree, emulation = _fit(Arithmetic(native)), _fit(Arithmetic(torch.float32, emulated))
    assert torch.equal(tree.nodes.feature, emulation.nodes.feature)
    assert torch.equal(tree.nodes.threshold.float(), emulation.nodes.threshold)


def test_fp8_tree_fits_its_rounded_training_set_and_generalises():
    """fp8_e4m3 rounds the features to 3 significand bits (7.9 becomes 8), yet leaves no equal
    rows with different labels on this split, so a fully grown tree still fits every training
    point; its coarse splits need a deeper tree and cost a few test points (42/45 here)."""
    x_train, x_test, y_train, y_test = _iris()
    tree = _fit(FP8)
    assert _conflicts(FP8(torch.tensor(x_train)), torch.tensor(y_train)) == 0
    assert tree.score(x_train, y_train) == 1.0
    assert tree.nodes.depth > _fit(FP64).nodes.depth
    assert tree.score(x_test, y_test) > 0.9


def test_class_count_sums_are_rounded_to_the_precision():
    ones = torch.ones(2050)
    counts = Arithmetic(torch.float16).cumsum(Arithmetic(torch.float16)(ones), 0)
    assert counts[2047] == 2048 and counts[2048] == 2048 and counts[2049] == 2050  # 2049 is not an fp16
    fp8_counts = FP8.cumsum(FP8(ones[:20]), 0)
    assert torch.equal(fp8_counts[:16], torch.arange(1.0, 17.0))
    assert fp8_counts[16] == 16  # 17 rounds to even


def test_rounded_counts_change_the_split_and_the_tree_still_grows():
    """Labels 0, 1, 1, then twenty 0s on fp8-exact x. Exactly, the best root split leaves three
    samples on the left. In fp8 the split after two leaves [twenty 0s, one 1] on the right,
    whose count 21 rounds to 20: its shares round to 1 and 0.05, their squares to 1 and
    ~0.002, and 1 + 0.002 to 1, so that side's impurity is 0 and the split wins."""
    x = torch.tensor([float(v) for v in range(17)] + [18.0, 20.0, 22.0, 24.0, 26.0, 28.0])[:, None]
    y = torch.tensor([0, 1, 1] + [0] * 20)
    assert torch.equal(FP8(x), x)

    def left_count(arith):
        tree = DecisionTree(arith, max_depth=1).fit(x, y)
        return int((x[:, 0] <= tree.nodes.threshold[0].double()).sum())

    assert left_count(FP64) == 3
    assert left_count(FP8) == 2
    assert DecisionTree(FP8).fit(x, y).score(x, y) == 1.0


def test_parameters_limit_growth():
    x_train, _, y_train, _ = _iris()
    stump = DecisionTree(max_depth=1).fit(x_train, y_train)
    assert stump.nodes.depth == 1 and len(stump.nodes.feature) == 3
    tree = DecisionTree(min_samples_leaf=10).fit(x_train, y_train)
    leaves = tree.apply(x_train)
    assert (tree.nodes.feature[leaves] == -1).all()
    assert torch.bincount(leaves)[tree.nodes.feature == -1].min() >= 10
