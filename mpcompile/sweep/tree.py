"""A CART decision tree whose split search runs in a chosen precision.

A classical model for the precision sweep, compared with scikit-learn's tree at fp64. The
features are held in the precision, and so is every number the split search computes: the
class counts' prefix sums over the sorted samples (exact in fp16 only up to 2048, in fp8_e4m3
only up to 16: this is where low precision shows first), each candidate split's Gini impurity
and the thresholds, all rounded by the ``Arithmetic`` after every operation.

The search is vectorised over samples and features; only nodes are visited one at a time.
Ties between splits of equal impurity go to the lowest feature index, then the lowest
threshold (scikit-learn visits the features in a random order and keeps the first best).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .arithmetic import Arithmetic

__all__ = ["DecisionTree", "Nodes"]


@dataclass(frozen=True)
class Nodes:
    """A fitted tree as arrays with one entry per node, node 0 the root.

    A sample goes left at an inner node when ``x[feature] <= threshold``.
    """

    feature: torch.Tensor  # int64; -1 at a leaf
    threshold: torch.Tensor  # in the tree's precision; 0 at a leaf
    left: torch.Tensor  # int64 child index; -1 at a leaf
    right: torch.Tensor  # int64 child index; -1 at a leaf
    label: torch.Tensor  # int64 class index: the node's majority class (ties: the lowest)
    depth: int  # the longest root-to-leaf path, in edges


class _Split(NamedTuple):
    feature: int
    threshold: torch.Tensor  # 0-d, in the precision


@dataclass
class DecisionTree:
    """A CART classifier: binary splits on feature thresholds chosen by Gini impurity.

    Grown until every leaf is pure or a limit stops it (scikit-learn's defaults). A split is
    taken even when, in a coarse precision, it does not lower the rounded impurity: every split
    makes both children smaller, so growth ends.

    Args:
        arith: the precision of the features and the split search.
        max_depth: the deepest a leaf may be; None for no limit.
        min_samples_split: a node with fewer samples is a leaf.
        min_samples_leaf: a split leaving fewer samples on either side is not considered.
    """

    arith: Arithmetic = field(default_factory=lambda: Arithmetic(torch.float64))
    max_depth: int | None = None
    min_samples_split: int = 2
    min_samples_leaf: int = 1
    nodes: Nodes | None = field(default=None, init=False, repr=False)
    classes: torch.Tensor | None = field(default=None, init=False, repr=False)

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> DecisionTree:
        """Grow the tree on training data.

        Args:
            x: (n, d) features (anything ``torch.as_tensor`` reads), put into the precision.
            y: (n,) class labels of any integer values.

        Returns:
            self, fitted.
        """
        x, y = self.arith(torch.as_tensor(x)), torch.as_tensor(y)
        if x.dim() != 2 or y.shape != x.shape[:1] or len(y) == 0:
            raise ValueError(f"DecisionTree.fit: x must be (n, d) and y (n,) with n > 0, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        self.classes, labels = torch.unique(y, return_inverse=True)
        onehot = self.arith(F.one_hot(labels, len(self.classes)))
        feature, threshold, left, right, label, depths = [], [], [], [], [], []
        zero = self.arith(torch.zeros(()))
        stack = [(torch.arange(len(y)), 0, -1, left)]  # samples, depth, parent, the parent's child list
        while stack:
            samples, depth, parent, children = stack.pop()
            node = len(feature)
            if parent >= 0:
                children[parent] = node
            counts = self.arith.sum(onehot[samples], 0)
            label.append(int(counts.argmax()))
            depths.append(depth)
            split = self._split(x[samples], onehot[samples], labels[samples], counts, depth)
            left.append(-1)
            right.append(-1)
            if split is None:
                feature.append(-1)
                threshold.append(zero)
                continue
            feature.append(split.feature)
            threshold.append(split.threshold)
            goes_left = x[samples, split.feature] <= split.threshold
            stack.append((samples[~goes_left], depth + 1, node, right))
            stack.append((samples[goes_left], depth + 1, node, left))
        ints = [torch.tensor(v, dtype=torch.int64) for v in (feature, left, right, label)]
        self.nodes = Nodes(ints[0], torch.stack(threshold), ints[1], ints[2], ints[3], max(depths))
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The leaf each row reaches.

        Args:
            x: (m, d) features, put into the tree's precision.

        Returns:
            (m,) node indices into ``nodes``.
        """
        if self.nodes is None:
            raise RuntimeError("DecisionTree: call fit first")
        t = self.nodes
        x = self.arith(torch.as_tensor(x))
        node = torch.zeros(len(x), dtype=torch.int64)
        for _ in range(t.depth):
            f = t.feature[node]
            value = x.gather(1, f.clamp_min(0)[:, None])[:, 0]
            child = torch.where(value <= t.threshold[node], t.left[node], t.right[node])
            node = torch.where(f >= 0, child, node)
        return node

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted class of each row: its leaf's majority class.

        Args:
            x: (m, d) features, put into the tree's precision.

        Returns:
            (m,) labels, of the values and dtype of ``y`` in ``fit``.
        """
        leaves = self.apply(x)
        return self.classes[self.nodes.label[leaves]]

    def score(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy: the share of rows whose predicted class is ``y``.

        Args:
            x: (m, d) features.
            y: (m,) true labels.
        """
        return (self.predict(x) == torch.as_tensor(y)).double().mean().item()

    def _split(self, x: torch.Tensor, onehot: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
               depth: int) -> _Split | None:
        """The best split of one node's samples, or None where the node is a leaf."""
        n, leaf = len(labels), self.min_samples_leaf
        if ((labels == labels[0]).all() or n < self.min_samples_split or n < 2 * leaf
                or (self.max_depth is not None and depth >= self.max_depth)):
            return None
        a = self.arith
        xs, order = torch.sort(x, dim=0, stable=True)  # (n, d)
        sorted_onehot = onehot[order]  # (n, d, classes)
        left = a.cumsum(sorted_onehot, 0)[:-1]  # position i: the class counts of samples 0..i
        right = a.cumsum(sorted_onehot.flip(0), 0).flip(0)[1:]  # and of samples i+1..n-1
        impurity = a(a(self._weighted_gini(left) + self._weighted_gini(right)) / a.sum(counts, 0))
        position = torch.arange(1, n)[:, None]  # samples on the left
        valid = (xs[:-1] < xs[1:]) & (position >= leaf) & (n - position >= leaf)
        if not valid.any():
            return None
        impurity = torch.where(valid, impurity, torch.full((), torch.inf, dtype=impurity.dtype))
        best = int(impurity.T.reshape(-1).argmin())  # the first minimum: lowest feature, then position
        f, i = divmod(best, n - 1)
        lo, hi = xs[i, f], xs[i + 1, f]
        half = a(torch.tensor(0.5))
        mid = a(a(lo * half) + a(hi * half))  # halves first: lo + hi may overflow
        # rounding may put the midpoint on hi (or, among subnormals, under lo): lo then separates
        return _Split(f, mid if lo <= mid < hi else lo)

    def _weighted_gini(self, counts: torch.Tensor) -> torch.Tensor:
        """n * (1 - sum_k (c_k / n)**2) for class counts (..., classes) with n = sum_k c_k > 0."""
        a = self.arith
        n = a.sum(counts, -1)
        share = a(counts / n[..., None])
        gini = a(a(torch.ones(())) - a.sum(a(share * share), -1))
        return a(n * gini)
