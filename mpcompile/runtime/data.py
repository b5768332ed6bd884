"""Image-classification data sets for training, held in memory as tensors.

``load_dataset`` reads one of ``DATASETS`` into a ``Dataset`` (compact images plus the per-channel
mean and std that normalize them); ``batches`` walks a split in an order fixed by (seed, epoch)
alone, so a resumed run sees exactly the batches the interrupted one would have. Nothing is ever
downloaded: MNIST, Fashion-MNIST and CIFAR-10 are read from a local folder laid out as torchvision
downloads them.
"""
from __future__ import annotations

import difflib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torchvision.datasets import CIFAR10, MNIST, FashionMNIST

from ..errors import MpcompileError

__all__ = ["DATASETS", "Dataset", "DataError", "load_dataset", "batches", "num_batches"]

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "fake")
SPLITS = ("train", "test")

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
# Image i of a fake split is drawn from a generator seeded with offset + i, so it does not depend on fake_size.
_FAKE_OFFSETS = {"train": 0, "test": 1 << 31}


class DataError(MpcompileError, ValueError):
    """A data set that cannot be found or read, or a bad request for batches of it."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image data set split into train and test, held in memory.

    Images are (N, C, H, W): uint8 where the source is uint8 (normalized as x/255), else float32
    already scaled to [0, 1]. ``mean`` and ``std`` have one entry per channel.
    """

    name: str
    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        for split in SPLITS:
            x, y = self._split(split)
            if x.dim() != 4 or y.shape != (len(x),) or y.dtype != torch.int64:
                raise DataError(f"data set {self.name!r}, {split} split: images must be (N, C, H, W) and labels int64 (N,), "
                                f"got {tuple(x.shape)} and {y.dtype} {tuple(y.shape)}; build it with load_dataset")
        if not len(self.mean) == len(self.std) == self.train_x.shape[1] == self.test_x.shape[1]:
            raise DataError(f"data set {self.name!r}: mean {self.mean} and std {self.std} need one entry per channel "
                            f"(train images have {self.train_x.shape[1]}, test images {self.test_x.shape[1]})")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train_x.shape[1:]
        return c, h, w

    def size(self, split: str) -> int:
        """Number of examples in ``split`` ("train" or "test")."""
        return len(self._split(split)[1])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 ``(x - mean) / std`` per channel, after ``x / 255`` for uint8 ``x``.

        Args:
            x: images (..., C, H, W), uint8 or float in [0, 1].
        """
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        return (x - mean) / std

    def batch(self, split: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized float32 inputs and int64 labels of the examples at ``index``.

        Args:
            split: "train" or "test".
            index: int64 indices into the split.
        """
        x, y = self._split(split)
        return self.normalize(x[index]), y[index]

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "train":
            return self.train_x, self.train_y
        if split == "test":
            return self.test_x, self.test_y
        raise DataError(f"data set {self.name!r} has no split {split!r}; use one of {', '.join(SPLITS)}")


def load_dataset(name: str, data_dir: str | Path | None = None, *, fake_size: int = 256) -> Dataset:
    """Read a data set into memory; nothing is downloaded.

    Args:
        name: one of ``DATASETS``.
        data_dir: folder holding MNIST/ or cifar-10-batches-py/ as torchvision downloads them
            (needed for mnist, fashion_mnist and cifar10, ignored otherwise).
        fake_size: number of train images of the fake data set (it has fake_size // 4 test images).
    """
    if name == "digits":
        return _load_digits()
    if name == "mnist":
        return _load_mnist(data_dir)
    if name == "fashion_mnist":
        return _load_fashion_mnist(data_dir)
    if name == "cifar10":
        return _load_cifar10(data_dir)
    if name == "fake":
        return _load_fake(fake_size)
    close = difflib.get_close_matches(name.lower(), DATASETS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DataError(f"unknown data set {name!r}: {hint}use one of {', '.join(DATASETS)}")


def num_batches(data: Dataset, split: str, batch_size: int) -> int:
    """Number of batches ``batches`` yields for one pass over ``split`` (the last may be partial).

    Args:
        data: the data set.
        split: "train" or "test".
        batch_size: examples per batch, at least 1.
    """
    _check_batch_size(batch_size)
    return -(-data.size(split) // batch_size)


def batches(data: Dataset, split: str, batch_size: int, *, shuffle: bool, seed: int,
            epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over ``split`` as (normalized inputs, labels) batches; the last batch may be partial.

    The order depends on (seed, epoch) only, never on the global RNG, which is left untouched.

    Args:
        data: the data set.
        split: "train" or "test".
        batch_size: examples per batch, at least 1.
        shuffle: visit the examples in a random order instead of 0, 1, 2, ...
        seed: the run's seed.
        epoch: the epoch number; each epoch of a run gets its own order.
    """
    _check_batch_size(batch_size)
    n = data.size(split)
    if shuffle:
        # torch seeds are 64-bit; reduce so any Python int (negative, huge) is accepted.
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 64))
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    for start in range(0, n, batch_size):
        yield data.batch(split, order[start:start + batch_size])


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch size must be a positive integer, got {batch_size!r}; pass e.g. --batch-size 64")


def _load_digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DataError("the digits data set ships with scikit-learn, which is not installed: "
                        "pip install scikit-learn, or use --data fake") from e
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16  # pixel values are 0..16
    y = torch.tensor(bunch.target, dtype=torch.int64)
    # A fixed split, independent of the run's seed, so every run is scored on the same test set.
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.25, stratify=bunch.target,
                                           random_state=0)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    train_x = x[train_idx]
    mean, std = train_x.double().mean().item(), train_x.double().std(correction=0).item()
    return Dataset("digits", train_x, y[train_idx], x[test_idx], y[test_idx], 10, (mean,), (std,))


def _check_files(name: str, data_dir: str | Path | None, folder: str, files: tuple[str, ...], make: str) -> None:
    """Raise DataError, saying how to get the data, unless ``data_dir``/``folder`` holds all ``files``."""
    top = folder.split("/")[0]
    how = (f"it should hold {folder}/{{{', '.join(files)}}}; nothing is downloaded at run time. "
           f"On a machine with internet run\n"
           f"    python -c \"import torchvision; torchvision.datasets.{make}('DIR', download=True)\"\n"
           f"then copy DIR here and pass --data-dir DIR (the folder that contains {top}/, not {top}/ itself)")
    if data_dir is None:
        raise DataError(f"data set {name!r} needs a data directory (--data-dir DIR); {how}")
    base = Path(data_dir) / folder
    missing = [f for f in files if not (base / f).is_file()]
    if missing:
        where = f"{Path(data_dir)} is not a directory" if not Path(data_dir).is_dir() else f"{base} lacks {', '.join(missing)}"
        raise DataError(f"data set {name!r} not found in data directory {Path(data_dir)}: {where}; {how}")


def _read(name: str, data_dir: str | Path, folder: str, dataset_cls: type[MNIST] | type[CIFAR10]) -> tuple:
    """The train and test torchvision data sets, with read failures turned into DataError."""
    root = os.fspath(data_dir)
    try:
        return dataset_cls(root, train=True, download=False), dataset_cls(root, train=False, download=False)
    except (RuntimeError, ValueError, TypeError, AssertionError, KeyError, EOFError, OSError,
            pickle.UnpicklingError) as e:
        raise DataError(f"data set {name!r}: could not read the files in {Path(data_dir) / folder} "
                        f"({type(e).__name__}: {e}); they may be truncated or corrupt: download them again") from e


def _load_mnist(data_dir: str | Path | None) -> Dataset:
    _check_files("mnist", data_dir, "MNIST/raw", _MNIST_FILES, "MNIST")
    train, test = _read("mnist", data_dir, "MNIST/raw", MNIST)
    return Dataset("mnist", train.data.unsqueeze(1).contiguous(), train.targets.long(),
                   test.data.unsqueeze(1).contiguous(), test.targets.long(), 10, (0.1307,), (0.3081,))


def _load_fashion_mnist(data_dir: str | Path | None) -> Dataset:
    _check_files("fashion_mnist", data_dir, "FashionMNIST/raw", _MNIST_FILES, "FashionMNIST")
    train, test = _read("fashion_mnist", data_dir, "FashionMNIST/raw", FashionMNIST)
    return Dataset("fashion_mnist", train.data.unsqueeze(1).contiguous(), train.targets.long(),
                   test.data.unsqueeze(1).contiguous(), test.targets.long(), 10, (0.2860,), (0.3530,))


class _LocalCIFAR10(CIFAR10):
    """torchvision's CIFAR10 that only checks the batch files exist.

    torchvision compares the md5 sums of the files with those of the official download, which
    refuses any subset or re-pickled copy of the data; the pickles are still read by torchvision.
    """

    meta = {**CIFAR10.meta, "md5": None}  # check_integrity(path, None) only checks the file exists

    def _check_integrity(self) -> bool:
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f, _ in self.train_list + self.test_list)


def _load_cifar10(data_dir: str | Path | None) -> Dataset:
    _check_files("cifar10", data_dir, CIFAR10.base_folder, _CIFAR_FILES, "CIFAR10")
    train, test = _read("cifar10", data_dir, CIFAR10.base_folder, _LocalCIFAR10)
    chw = lambda d: torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous()  # torchvision keeps (N, H, W, C)
    return Dataset("cifar10", chw(train), torch.tensor(train.targets, dtype=torch.int64),
                   chw(test), torch.tensor(test.targets, dtype=torch.int64), 10,
                   (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def _load_fake(fake_size: int) -> Dataset:
    """Random uint8 3x32x32 images with random labels in 10 classes, the same on every machine.

    Not torchvision's FakeData: it reseeds the global RNG for every image (restoring only the CPU
    generator, so the CUDA one is left reseeded) and casts out-of-range floats to uint8, which
    gives different pixels on different CPUs.
    """
    if not isinstance(fake_size, int) or fake_size < 4:
        raise DataError(f"fake_size must be an integer of at least 4 (the test split has fake_size // 4 images), "
                        f"got {fake_size!r}")

    def split(n: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for i in range(n):
            g = torch.Generator().manual_seed(offset + i)
            xs.append(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g))
            ys.append(torch.randint(0, 10, (), generator=g))
        return torch.stack(xs), torch.stack(ys)

    train_x, train_y = split(fake_size, _FAKE_OFFSETS["train"])
    test_x, test_y = split(fake_size // 4, _FAKE_OFFSETS["test"])
    return Dataset("fake", train_x, train_y, test_x, test_y, 10, (0.5,) * 3, (0.5,) * 3)
