"""The models a sweep trains, by name, each on its own data set and with its scikit-learn reference.

Two kinds. A ``Network`` is a torch module trained by SGD (momentum 0.9, a cosine learning
rate) for a fixed number of epochs: linear regression (squared loss), logistic regression
(cross-entropy) and a linear SVM (the multiclass hinge loss of Crammer and Singer) with the L2
penalty of scikit-learn's estimators at C = 1, and the MLP, LeNet-5 and ResNet-20 of
``mpcompile.models``. A ``Solver`` computes its model in one pass, in an ``Arithmetic``:
least squares by QR or the normal equations, and a CART tree. ``name@data`` trains a model on
another data set (``logreg@wine``); ``package.module:factory`` is any network (its factory
called with ``num_classes``), trained like the MLP.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MpcompileError
from ..models import build_model
from .arithmetic import Arithmetic
from ..runtime.data import DataError
from .data import SweepData, load_data
from .least_squares import least_squares, r2_score
from .tree import DecisionTree

__all__ = ["Network", "Solver", "SweepModel", "SWEEP_MODELS", "sweep_model", "score"]

# the score at which a run has reached its target (time to target), per data set
TARGETS = {"iris": 0.9, "wine": 0.9, "breast_cancer": 0.9, "diabetes": 0.35, "digits": 0.9, "mnist": 0.97,
           "fashion_mnist": 0.85, "cifar10": 0.6, "fake": 0.0}


@dataclass(frozen=True)
class Network:
    """A torch module trained by minibatch SGD.

    Attributes:
        build: the fp32 module for a data set.
        loss: ``mse`` (a regression, on targets standardized by the train split), ``cross_entropy``
            or ``hinge`` (Crammer-Singer).
        epochs, batch_size, lr: the schedule (cosine from ``lr`` to 0 over the epochs).
        l2_C: scikit-learn's C of an L2 penalty ``|w|^2 / (2 C n)`` per example (None: none).
        penalize_bias: whether the penalty covers the biases too (LinearSVC's does).
        standardize: scale the features to mean 0 and std 1 first.
    """

    build: Callable[[SweepData], nn.Module]
    loss: str = "cross_entropy"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    l2_C: float | None = None
    penalize_bias: bool = False
    standardize: bool = False


@dataclass(frozen=True)
class Solver:
    """A model computed in one pass: ``fit(data, arith)`` returns its predictions' function."""

    fit: Callable[[SweepData, Arithmetic], Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class SweepModel:
    """A model of the sweep: what trains, on which data, against which reference.

    Attributes:
        name: as the user wrote it (``logreg``, ``logreg@wine``).
        data: the data set's name (``sweep.data``).
        trainer: a ``Network`` or a ``Solver``.
        reference: scikit-learn's score of the same model on the same split, at fp64 (None: none).
    """

    name: str
    data: str
    trainer: Network | Solver
    reference: Callable[[SweepData], float] | None = None

    @property
    def metric(self) -> str:
        return "r2" if self.data == "diabetes" else "accuracy"

    @property
    def target(self) -> float:
        return TARGETS.get(self.data, 0.0)


def _linear(data: SweepData) -> nn.Module:
    return nn.Linear(math.prod(data.input_shape), max(data.num_classes, 1))


def _image_model(name: str) -> Callable[[SweepData], nn.Module]:
    def build(data: SweepData) -> nn.Module:
        c, h, w = data.input_shape
        sizes = {"mlp": {"in_features": c * h * w}, "lenet5": {"in_channels": c, "image_size": h},
                 "resnet20": {"in_channels": c}}[name]
        return build_model(name, num_classes=data.num_classes, **sizes)
    return build


def _least_squares(method: str) -> Solver:
    def fit(data: SweepData, arith: Arithmetic) -> Callable[[torch.Tensor], torch.Tensor]:
        w, b = least_squares(data.x_train, data.y_train, arith, method=method)
        return lambda x: arith(arith(arith(x) @ w) + b)
    return Solver(fit)


def _tree(data: SweepData, arith: Arithmetic) -> Callable[[torch.Tensor], torch.Tensor]:
    return DecisionTree(arith).fit(data.x_train, data.y_train).predict


def _sklearn(name: str, *, standardize: bool = False, random_states: int = 0, **kwargs) -> Callable[[SweepData], float]:
    """scikit-learn's estimator ``name`` fitted on the train split, scored on the test split; with
    ``random_states``, the mean score over that many (its tree breaks ties between equally good
    splits by a random feature order, so one random state is one of several equally good trees)."""
    def reference(data: SweepData) -> float:
        import sklearn.linear_model
        import sklearn.svm
        import sklearn.tree

        data = data.standardized() if standardize else data
        cls = next(getattr(m, name) for m in (sklearn.linear_model, sklearn.svm, sklearn.tree) if hasattr(m, name))
        states = [{"random_state": s} for s in range(random_states)] or [{}]
        scores = [cls(**kwargs, **state).fit(data.x_train.numpy(), data.y_train.numpy())
                  .score(data.x_test.numpy(), data.y_test.numpy()) for state in states]
        return sum(scores) / len(scores)
    return reference


_IMAGES = {"epochs": 10, "batch_size": 64, "lr": 0.05}
# name -> (default data set, trainer, reference)
SWEEP_MODELS: dict[str, tuple[str, Network | Solver, Callable[[SweepData], float] | None]] = {
    "linreg": ("diabetes", Network(_linear, "mse", epochs=100, batch_size=32, lr=0.01, standardize=True),
               _sklearn("LinearRegression", standardize=True)),
    "linreg_qr": ("diabetes", _least_squares("qr"), _sklearn("LinearRegression")),
    "linreg_normal": ("diabetes", _least_squares("normal"), _sklearn("LinearRegression")),
    "logreg": ("iris", Network(_linear, "cross_entropy", epochs=200, batch_size=16, lr=0.1, l2_C=1.0,
                               standardize=True), _sklearn("LogisticRegression", standardize=True, C=1.0, max_iter=10000)),
    "svm": ("iris", Network(_linear, "hinge", epochs=200, batch_size=16, lr=0.05, l2_C=1.0, penalize_bias=True,
                            standardize=True),
            _sklearn("LinearSVC", standardize=True, C=1.0, loss="hinge", multi_class="crammer_singer",
                     max_iter=100000)),
    "tree": ("iris", Solver(_tree), _sklearn("DecisionTreeClassifier", random_states=10)),
    "mlp": ("digits", Network(_image_model("mlp"), **_IMAGES), None),
    "lenet5": ("digits", Network(_image_model("lenet5"), **_IMAGES), None),
    "resnet20": ("digits", Network(_image_model("resnet20"), **{**_IMAGES, "epochs": 3}), None),
}


# the data sets a model trains on where ``data_dir`` holds them, in order of preference (else its default)
PREFERRED_DATA = {"mlp": ("fashion_mnist", "mnist"), "lenet5": ("cifar10",), "resnet20": ("cifar10",)}


def sweep_model(name: str, *, epochs: int | None = None, data_dir: str | Path | None = None) -> SweepModel:
    """The model ``name``: one of ``SWEEP_MODELS``, ``name@data``, or ``package.module:factory``
    (trained on digits unless ``@data`` says otherwise). Without ``@data``, the MLP trains on
    Fashion-MNIST or MNIST, LeNet-5 and ResNet-20 on CIFAR-10, where ``data_dir`` holds them.

    Args:
        name: as above.
        epochs: a network's epochs instead of its default.
        data_dir: where mnist, fashion_mnist and cifar10 are.

    Raises:
        MpcompileError: an unknown model.
    """
    base, _, data = name.partition("@")
    if base in SWEEP_MODELS:
        default_data, trainer, reference = SWEEP_MODELS[base]
    elif ":" in base:
        default_data, trainer, reference = "digits", Network(lambda d: build_model(base, num_classes=d.num_classes),
                                                             **_IMAGES), None
    else:
        raise MpcompileError(f"unknown sweep model {base!r}: use one of {', '.join(SWEEP_MODELS)}, name@data "
                             f"(e.g. logreg@wine) or package.module:factory")
    if epochs is not None and isinstance(trainer, Network):
        trainer = dataclasses.replace(trainer, epochs=epochs)
    if not data and data_dir is not None:
        default_data = next((d for d in PREFERRED_DATA.get(base, ()) if _holds(data_dir, d)), default_data)
    return SweepModel(name, data or default_data, trainer, reference)


def _holds(data_dir: str | Path, name: str) -> bool:
    try:
        load_data(name, data_dir)
    except DataError:
        return False
    return True


def network_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss ``kind`` of outputs ``out`` against labels or (standardized) targets ``y``."""
    if kind == "mse":
        return F.mse_loss(out.squeeze(1), y.to(out.dtype))
    if kind == "cross_entropy":
        return F.cross_entropy(out, y)
    # Crammer-Singer: max(0, 1 + max_{j != y} s_j - s_y)
    margins = out - out.gather(1, y[:, None]) + 1
    return margins.scatter(1, y[:, None], 0).amax(1).clamp_min(0).mean()


def score(metric: str, pred: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of logits or labels ``pred``, or R2 of predictions ``pred``, against ``y``."""
    if metric == "r2":
        return r2_score(pred.reshape(-1).double(), y.double())
    labels = pred.argmax(1) if pred.dim() == 2 else pred
    return float((labels.cpu() == y.cpu()).double().mean())
