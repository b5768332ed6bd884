"""Tests of mpcompile.runtime.data: the data sets, their fixed splits, and deterministic batching."""
from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from mpcompile.errors import MpcompileError
from mpcompile.runtime.data import DATASETS, Dataset, DataError, batches, load_dataset, num_batches


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def indexed(n: int) -> Dataset:
    """A data set whose image i is the constant i (mean 0, std 1), so batches reveal their indices."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    y = torch.arange(n, dtype=torch.int64)
    return Dataset("indexed", x, y, x[:3].clone(), y[:3].clone(), n, (0.0,), (1.0,))


def order(data: Dataset, split: str = "train", batch_size: int = 7, **kw) -> list[int]:
    kw = {"shuffle": True, "seed": 0, "epoch": 0, **kw}
    out = []
    for x, y in batches(data, split, batch_size, **kw):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x.view(-1).long(), y)  # inputs and labels stay paired
        out += y.tolist()
    return out


# digits

def test_digits_split_sizes_shapes_and_labels(digits):
    assert (len(digits.train_y), len(digits.test_y)) == (1347, 450)
    assert digits.train_x.shape == (1347, 1, 8, 8) and digits.test_x.shape == (450, 1, 8, 8)
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert set(digits.train_y.tolist()) == set(digits.test_y.tolist()) == set(range(10))
    assert digits.train_x.min() >= 0 and digits.train_x.max() <= 1


def test_digits_split_is_stratified(digits):
    all_y = torch.cat([digits.train_y, digits.test_y])
    for k in range(10):
        share = (all_y == k).sum().item() * 450 / 1797
        assert abs((digits.test_y == k).sum().item() - share) <= 1, k


def test_digits_split_is_sklearns_fixed_split(digits):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    train, test = train_test_split(np.arange(1797), test_size=0.25, stratify=bunch.target, random_state=0)
    assert digits.train_y.tolist() == bunch.target[train].tolist()
    assert torch.equal(digits.test_x * 16, torch.tensor(bunch.images[test], dtype=torch.float32).unsqueeze(1))
    again = load_dataset("digits")
    for a, b in [(again.train_x, digits.train_x), (again.train_y, digits.train_y),
                 (again.test_x, digits.test_x), (again.test_y, digits.test_y)]:
        assert torch.equal(a, b)


def test_digits_train_inputs_are_standardized(digits):
    x, _ = digits.batch("train", torch.arange(1347))
    assert x.dtype == torch.float32
    assert abs(x.mean().item()) < 1e-5 and abs(x.std(correction=0).item() - 1) < 1e-5
    t, _ = digits.batch("test", torch.arange(450))
    assert abs(t.mean().item()) < 0.1  # same normalization, different samples


# batches

def test_batches_order_depends_on_seed_and_epoch_only():
    data = indexed(50)
    first = order(data, seed=3, epoch=1)
    torch.manual_seed(123)  # the global RNG plays no part
    assert order(data, seed=3, epoch=1) == first
    assert order(data, seed=3, epoch=2) != first
    assert order(data, seed=4, epoch=1) != first
    assert first != list(range(50))
    assert order(data, shuffle=False) == list(range(50))


def test_batches_cover_every_index_once_and_keep_last_partial_batch():
    data = indexed(50)
    sizes = [len(y) for _, y in batches(data, "train", 16, shuffle=True, seed=0, epoch=0)]
    assert sizes == [16, 16, 16, 2]
    assert num_batches(data, "train", 16) == 4 and num_batches(data, "train", 10) == 5
    assert sorted(order(data, batch_size=16)) == list(range(50))
    assert [len(y) for _, y in batches(data, "test", 2, shuffle=False, seed=0, epoch=0)] == [2, 1]


def test_loading_and_batching_leave_global_rng_untouched(digits):
    before = torch.random.get_rng_state()
    order(indexed(20), seed=1, epoch=5)
    list(batches(digits, "train", 100, shuffle=True, seed=0, epoch=0))
    load_dataset("fake", fake_size=8)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("size", [0, -1, 2.0])
def test_bad_batch_size_is_refused(size):
    with pytest.raises(DataError, match="batch size"):
        next(batches(indexed(5), "train", size, shuffle=False, seed=0, epoch=0))
    with pytest.raises(DataError, match="batch size"):
        num_batches(indexed(5), "train", size)


def test_unknown_split_is_refused():
    with pytest.raises(DataError, match="'val'.*train, test"):
        num_batches(indexed(5), "val", 1)


# mnist

def write_idx(path, magic: int, array: np.ndarray) -> None:
    path.write_bytes(struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes())


def write_mnist(root, train_x, train_y, test_x, test_y, folder: str = "MNIST") -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", 2051, train_x)
    write_idx(raw / "train-labels-idx1-ubyte", 2049, train_y)
    write_idx(raw / "t10k-images-idx3-ubyte", 2051, test_x)
    write_idx(raw / "t10k-labels-idx1-ubyte", 2049, test_y)


@pytest.mark.parametrize("name, folder, mean, std", [("mnist", "MNIST", 0.1307, 0.3081),
                                                     ("fashion_mnist", "FashionMNIST", 0.2860, 0.3530)])
def test_mnist_round_trips_idx_files(tmp_path, name, folder, mean, std):
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (5, 28, 28), np.uint8), rng.integers(0, 256, (3, 28, 28), np.uint8)
    train_y, test_y = np.array([3, 1, 4, 1, 5]), np.array([9, 2, 6])
    write_mnist(tmp_path, train_x, train_y, test_x, test_y, folder)
    data = load_dataset(name, tmp_path)
    assert data.train_x.dtype == torch.uint8 and data.input_shape == (1, 28, 28)
    assert np.array_equal(data.train_x[:, 0].numpy(), train_x) and np.array_equal(data.test_x[:, 0].numpy(), test_x)
    assert data.train_y.tolist() == [3, 1, 4, 1, 5] and data.test_y.tolist() == [9, 2, 6]
    x, y = data.batch("test", torch.tensor([2]))
    assert y.tolist() == [6]
    assert x[0, 0, 7, 11].item() == pytest.approx((test_x[2, 7, 11] / 255 - mean) / std, abs=1e-6)


def test_mnist_truncated_file_is_a_data_error(tmp_path):
    imgs = np.zeros((2, 28, 28), np.uint8)
    write_mnist(tmp_path, imgs, np.array([0, 1]), imgs, np.array([0, 1]))
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="download them again"):
        load_dataset("mnist", tmp_path)


# cifar10

def write_cifar(root, train: list[np.ndarray], train_labels: list[list[int]], test: np.ndarray, test_labels: list[int]):
    # The official files are Python 2 pickles whose str keys torchvision reads (encoding="latin1")
    # as str: "data" (n, 3072) uint8 holding the R, G then B planes row-major, and "labels".
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = {f"data_batch_{i + 1}": {"data": d, "labels": lab} for i, (d, lab) in enumerate(zip(train, train_labels))}
    files["test_batch"] = {"data": test, "labels": test_labels}
    files["batches.meta"] = {"label_names": [f"class{k}" for k in range(10)]}
    for name, content in files.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))


def test_cifar10_round_trips_pickled_batches(tmp_path):
    rng = np.random.default_rng(1)
    train = [rng.integers(0, 256, (2, 3072), np.uint8) for _ in range(5)]
    labels = [[2 * i, 2 * i + 1] for i in range(5)]
    test = rng.integers(0, 256, (3, 3072), np.uint8)
    write_cifar(tmp_path, train, labels, test, [7, 8, 9])
    data = load_dataset("cifar10", tmp_path)
    assert data.train_x.shape == (10, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.input_shape == (3, 32, 32) and data.train_y.tolist() == list(range(10))
    assert data.test_y.tolist() == [7, 8, 9]
    # pixel (channel 2 = blue, row 5, column 17) of the second image of data_batch_4
    assert data.train_x[7, 2, 5, 17].item() == train[3][1, 2 * 1024 + 5 * 32 + 17]
    assert np.array_equal(data.train_x.reshape(10, 3072).numpy(), np.concatenate(train))
    assert np.array_equal(data.test_x.reshape(3, 3072).numpy(), test)
    x, _ = data.batch("train", torch.tensor([7]))
    assert x[0, 2, 5, 17].item() == pytest.approx((train[3][1, 2 * 1024 + 5 * 32 + 17] / 255 - 0.4465) / 0.2616,
                                                   abs=1e-6)


# missing data

@pytest.mark.parametrize("name, expected", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
                                            ("cifar10", "cifar-10-batches-py")])
def test_missing_data_names_directory_and_how_to_download(tmp_path, name, expected):
    with pytest.raises(DataError, match="--data-dir") as e:
        load_dataset(name)
    assert "download" in str(e.value) and expected in str(e.value)
    for where in (tmp_path, tmp_path / "nowhere"):
        with pytest.raises(DataError) as e:
            load_dataset(name, where)
        assert str(where) in str(e.value) and "download=True" in str(e.value) and expected in str(e.value)


def test_partly_missing_files_are_listed(tmp_path):
    write_cifar(tmp_path, [np.zeros((1, 3072), np.uint8)] * 5, [[0]] * 5, np.zeros((1, 3072), np.uint8), [0])
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="lacks data_batch_3;") as e:
        load_dataset("cifar10", tmp_path)
    assert isinstance(e.value, MpcompileError) and isinstance(e.value, ValueError)


# fake

def test_fake_shapes_and_determinism():
    data = load_dataset("fake", fake_size=16)
    assert data.train_x.shape == (16, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert 0 <= data.train_y.min() and data.train_y.max() < 10 and len(set(data.train_y.tolist())) > 1
    again = load_dataset("fake", fake_size=16)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)
    bigger = load_dataset("fake", fake_size=32)  # image i does not depend on the size
    assert torch.equal(bigger.train_x[:16], data.train_x) and torch.equal(bigger.test_x[:4], data.test_x)
    assert not torch.equal(data.train_x[:4], data.test_x)
    x, _ = data.batch("train", torch.arange(16))
    assert x.min() == -1 and x.max() == 1


def test_fake_size_too_small_is_refused():
    with pytest.raises(DataError, match="fake_size"):
        load_dataset("fake", fake_size=3)


# names

def test_unknown_name_suggests_the_closest():
    with pytest.raises(DataError, match="did you mean 'digits'") as e:
        load_dataset("digit")
    assert all(name in str(e.value) for name in DATASETS)
    with pytest.raises(DataError, match="did you mean 'cifar10'"):
        load_dataset("CIFAR-10")
