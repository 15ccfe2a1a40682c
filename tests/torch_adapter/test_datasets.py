"""Datasets from small files written in the exact standard formats."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy.io import savemat

from gdws_torch.io.datasets import load_dataset, num_classes


def write_cifar10(root, n_per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [b"x.png"] * n_per_batch,
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = batch
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}))
    return batches


def test_cifar10_python_batches(tmp_path):
    batches = write_cifar10(tmp_path)
    test = load_dataset("cifar10", tmp_path, "test")
    images, labels = test.tensors
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    raw = batches["test_batch"][b"data"].reshape(4, 3, 32, 32)
    np.testing.assert_array_equal((images * 255).round().numpy().astype(np.uint8), raw)
    assert labels.tolist() == batches["test_batch"][b"labels"]
    assert len(load_dataset("cifar10", tmp_path, "train")) == 20
    assert num_classes("cifar10") == 10


def test_cifar100_python_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        batch = {b"data": data, b"fine_labels": [5, 99, 0], b"coarse_labels": [1, 2, 3]}
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    images, labels = load_dataset("cifar100", tmp_path, "test").tensors
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == [5, 99, 0]


def test_svhn_mat(tmp_path):
    rng = np.random.default_rng(2)
    X = rng.integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[1], [10], [3], [10], [9]], dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": X, "y": y})
    images, labels = load_dataset("svhn", tmp_path, "test").tensors
    assert labels.tolist() == [1, 0, 3, 0, 9]
    np.testing.assert_array_equal(
        (images[2] * 255).round().numpy().astype(np.uint8), np.transpose(X[..., 2], (2, 0, 1))
    )


def test_digits_split_and_upsampling():
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and len(test) == 540
    images, labels = test.tensors
    assert images.shape[1:] == (1, 8, 8) and float(images.max()) <= 1
    assert set(labels.tolist()) == set(range(10))
    big = load_dataset("digits", split="test", size=32).tensors[0]
    assert big.shape[1:] == (1, 32, 32) and 0 <= float(big.min()) and float(big.max()) <= 1


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/test_batch"):
        load_dataset("cifar10", tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a valid batch file"):
        load_dataset("cifar10", tmp_path)
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(ValueError, match=r"expected uint8 \(N, 3072\)"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"test_32x32\.mat"):
        load_dataset("svhn", tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="SVHN"):
        load_dataset("svhn", tmp_path)
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="val")


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickle_asking_for_code_is_refused(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}))
    with pytest.raises(ValueError, match=r"refused to load builtins\.print"):
        load_dataset("cifar10", tmp_path)
    assert "pwned" not in capsys.readouterr().out
