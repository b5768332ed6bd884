"""Small real models for the CLI, the examples and training: LeNet-5, an MLP, logistic
regression and the CIFAR ResNet-20. Each one traces with ``torch.fx.symbolic_trace``."""
from __future__ import annotations

import difflib
import importlib
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MpcompileError

__all__ = ["LeNet5", "BasicBlock", "ResNet20", "lenet5", "mlp", "logreg", "resnet20", "MODELS", "build_model"]


class LeNet5(nn.Module):
    """LeNet-5 for small square images; see ``lenet5``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8):
        super().__init__()
        if image_size <= 0 or image_size % 4:
            raise ValueError(f"lenet5: image_size must be a positive multiple of 4 (two 2x2 max-pools halve it "
                             f"twice), got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _PadShortcut(nn.Module):
    """Option A shortcut: take every other pixel and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.pad pads trailing dimensions first: (W, W, H, H, C, C); split the extra channels evenly.
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BatchNorm layers with an identity (or option A) shortcut, as in He et al. 2016."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        downsample = stride != 1 or in_planes != planes
        self.shortcut = _PadShortcut(planes - in_planes) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 of He et al. 2016 (section 4.2); see ``resnet20``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, in_planes = [], 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(3):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if stage > 0 and i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out))
        return self.fc(torch.flatten(out, 1))


def lenet5(in_channels: int = 1, num_classes: int = 10, image_size: int = 8) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) adapted to small inputs.

    Layers: conv 5x5 (6 channels, padding 2), ReLU, 2x2 max-pool; conv 5x5 (16 channels,
    padding 2), ReLU, 2x2 max-pool; flatten; linear 120, ReLU; linear 84, ReLU; linear
    ``num_classes``. It differs from the original, which takes 32x32 inputs, in that: both
    convolutions are same-padded (the original's are unpadded, 32 -> 28 and 14 -> 10), so any
    multiple of 4 works; it uses ReLU instead of the scaled tanh and max-pooling instead of
    the trainable average subsampling; the second convolution sees all 6 input maps (not the
    original's sparse connection table); C5 is a linear layer on the flattened maps; and the
    output is a plain linear layer (logits) instead of Euclidean RBF units.

    Args:
        in_channels: input image channels (1 for digits and MNIST, 3 for CIFAR).
        num_classes: number of output logits.
        image_size: side of the square input: 8 (sklearn digits), 28 (MNIST), 32 (CIFAR);
            must be a positive multiple of 4, else ``ValueError``.
    """
    return LeNet5(in_channels, num_classes, image_size)


def mlp(in_features: int = 64, num_classes: int = 10, hidden: tuple[int, ...] = (128, 128)) -> nn.Module:
    """A multilayer perceptron: flatten, then linear layers with ReLU between.

    Args:
        in_features: size of the flattened input (64 for 8x8 sklearn digits).
        num_classes: number of output logits.
        hidden: widths of the hidden layers; empty gives logistic regression.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def logreg(in_features: int = 64, num_classes: int = 10) -> nn.Module:
    """Multinomial logistic regression: flatten, then one linear layer (logits).

    Args:
        in_features: size of the flattened input.
        num_classes: number of output logits.
    """
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """The CIFAR ResNet-20 of He et al. 2016 (section 4.2), about 0.27M parameters.

    A 3x3 conv with 16 channels, then 3 stages of 3 basic blocks with 16, 32 and 64 channels
    (stride 2 at the first block of stages 2 and 3), BatchNorm after every conv, ReLU, global
    average pooling and a linear layer: 19 convs + 1 linear = 20 weighted layers. Shortcuts
    are option A of the paper (parameter-free: subsample and zero-pad the channels). Convs
    and the linear layer start from Kaiming-normal weights.

    Args:
        num_classes: number of output logits.
        in_channels: input image channels.
    """
    return ResNet20(num_classes, in_channels)


MODELS: dict[str, Callable[..., nn.Module]] = {"lenet5": lenet5, "mlp": mlp, "logreg": logreg, "resnet20": resnet20}


def build_model(name: str, **kwargs) -> nn.Module:
    """A model by name, built untrained: one of ``MODELS``, a torchvision classification model
    (``resnet18``), or ``package.module:factory`` (a callable that builds it).

    Args:
        name: as above.
        **kwargs: passed to the factory (e.g. ``num_classes``).
    """
    if name in MODELS:
        return MODELS[name](**kwargs)
    if ":" in name:
        module, _, factory = name.partition(":")
        try:
            return getattr(importlib.import_module(module), factory)(**kwargs)
        except (ImportError, AttributeError) as err:
            raise MpcompileError(f"model {name!r}: {err}; give package.module:factory, a callable that builds it")
    import torchvision

    vision = torchvision.models.list_models(module=torchvision.models)
    if name in vision:
        return torchvision.models.get_model(name, **kwargs)
    close = difflib.get_close_matches(name, [*MODELS, *vision], n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise MpcompileError(f"unknown model {name!r}{hint}; give one of mpcompile's ({', '.join(sorted(MODELS))}), "
                         f"a torchvision classification model, or package.module:factory")
