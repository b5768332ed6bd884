"""The data sets of a sweep: scikit-learn's bundled tables and the image sets of ``runtime.data``.

Every data set comes as float64 inputs and labels (int64) or targets (float64) split once into
train and test, the same split for every precision and seed, so that accuracies compare.
Tables (iris, wine, breast_cancer, diabetes) ship with scikit-learn: a fixed stratified 70/30
split (random_state 0); ``standardized`` scales their features by the train split's mean and
std, as a linear model wants. Image sets are ``runtime.data``'s (digits; mnist, fashion_mnist
and cifar10 from a ``data_dir``) with their own train/test split, normalized per channel.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MpcompileError
from ..runtime.data import DATASETS as IMAGE_SETS
from ..runtime.data import load_dataset

__all__ = ["TABLES", "SweepData", "load_data"]

TABLES = {"iris": "load_iris", "wine": "load_wine", "breast_cancer": "load_breast_cancer", "diabetes": "load_diabetes"}
_REGRESSION = ("diabetes",)


@dataclass(frozen=True)
class SweepData:
    """One data set, split.

    Attributes:
        name: its name.
        x_train, x_test: float64 inputs, (N, features) for tables, (N, C, H, W) for images.
        y_train, y_test: int64 labels, or float64 targets for a regression.
        num_classes: classes of a classification, 0 for a regression.
    """

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int

    @property
    def regression(self) -> bool:
        return self.num_classes == 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def standardized(self) -> "SweepData":
        """Features scaled to the train split's mean 0 and std 1 (a constant feature left at 0)."""
        mean, std = self.x_train.mean(0), self.x_train.std(0)
        std = torch.where(std > 0, std, 1.0)
        return SweepData(self.name, (self.x_train - mean) / std, self.y_train, (self.x_test - mean) / std,
                         self.y_test, self.num_classes)


def load_data(name: str, data_dir: str | Path | None = None) -> SweepData:
    """The data set ``name`` (one of ``TABLES`` or of ``runtime.data.DATASETS``), split.

    Raises:
        MpcompileError: an unknown name; ``runtime.data.DataError`` for an image set whose
            files are not in ``data_dir`` (it says how to get them).
    """
    if name in TABLES:
        return _table(name)
    if name in IMAGE_SETS:
        return _images(name, None if data_dir is None else str(data_dir))
    raise MpcompileError(f"unknown data set {name!r}: use one of {', '.join([*TABLES, *IMAGE_SETS])}")


@functools.lru_cache(maxsize=None)
def _table(name: str) -> SweepData:
    import sklearn.datasets
    from sklearn.model_selection import train_test_split

    x, y = getattr(sklearn.datasets, TABLES[name])(return_X_y=True)
    regression = name in _REGRESSION
    xa, xb, ya, yb = train_test_split(x, y, test_size=0.3, random_state=0, stratify=None if regression else y)
    target = torch.float64 if regression else torch.int64
    as_t = lambda a, dtype: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    return SweepData(name, as_t(xa, torch.float64), as_t(ya, target), as_t(xb, torch.float64), as_t(yb, target),
                     0 if regression else int(y.max()) + 1)


@functools.lru_cache(maxsize=None)
def _images(name: str, data_dir: str | None) -> SweepData:
    data = load_dataset(name, data_dir)
    mean = torch.tensor(data.mean, dtype=torch.float64)[:, None, None]
    std = torch.tensor(data.std, dtype=torch.float64)[:, None, None]

    def normalized(x: torch.Tensor) -> torch.Tensor:
        x = x.double() / 255 if x.dtype == torch.uint8 else x.double()
        return (x - mean) / std

    return SweepData(name, normalized(data.train_x), data.train_y, normalized(data.test_x), data.test_y,
                     data.num_classes)
