"""Datasets from their standard on-disk formats, as pixels in ``[0, 1]``.

- CIFAR-10: ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (the "python
  version" pickles: ``{b'data': uint8 (N, 3072), b'labels': [...]}``);
- CIFAR-100: ``<root>/cifar-100-python/{train, test}`` (``b'fine_labels'``);
- SVHN: ``<root>/{train,test}_32x32.mat`` (``X``: uint8 ``(32, 32, 3, N)``, ``y``: 1..10,
  10 meaning the digit 0);
- digits: scikit-learn's bundled 8x8 handwritten digits (real data that ships with the
  package): a fixed stratified split, optionally upsampled to 32x32;
- ImageNet (ILSVRC2012): ``<root>/train/<synset>/*.JPEG`` and ``<root>/val/<synset>/*.JPEG``,
  the 1000 class folders torchvision's ``ImageFolder`` reads (labels are the indices of the
  sorted folder names); decoded lazily with Pillow through the resize-256, centre-crop-224
  evaluation transform (:mod:`gdws_torch.io.imagefolder`), see docs/imagenet.md.

The CIFAR pickles are read by an unpickler that only accepts plain containers and NumPy
arrays: a file that asks for anything else is refused, never executed. Nothing is
downloaded.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DATASETS", "load_dataset", "num_classes"]

DATASETS = ("cifar10", "cifar100", "svhn", "digits", "imagenet")
_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "digits": 10, "imagenet": 1000}
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles store bytes: encodes a string, nothing else
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def num_classes(name: str) -> int:
    """Number of classes of a dataset name."""
    return _CLASSES[_check_name(name)]


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}; got {name!r}.")
    return name


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    return split


def _read_pickle(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what}: expected the file {str(path)!r}, which does not exist. Download the "
            "dataset's python version and extract it under the root you gave (nothing is "
            "downloaded for you)."
        )
    try:
        with open(path, "rb") as f:
            data = _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"{what}: {str(path)!r} is not a valid batch file ({exc}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {str(path)!r} does not hold a dict of arrays.")
    return data


def _labels(values: Any, low: int, high: int, where: str) -> np.ndarray:
    """``values`` as int64 class labels, all integers in ``[low, high]``, else a ValueError."""
    try:
        labels = np.asarray(values)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: the labels are not an array of integers ({exc}).") from None
    if labels.dtype.kind not in "iuf" or labels.ndim != 1:
        raise ValueError(
            f"{where}: the labels must be a 1-D sequence of integers; got {labels.dtype} of "
            f"shape {labels.shape}."
        )
    if labels.dtype.kind == "f":
        wrong = ~np.isfinite(labels) | (labels != np.round(labels))
        if wrong.any():
            raise ValueError(
                f"{where}: label {labels[wrong][0].item()!r} (at index {int(np.argmax(wrong))}) is "
                f"not an integer; labels are integers from {low} to {high}."
            )
    outside = (labels < low) | (labels > high)
    if outside.any():
        raise ValueError(
            f"{where}: label {labels[outside][0].item()!r} (at index {int(np.argmax(outside))}) is "
            f"outside {low}..{high}."
        )
    return labels.astype(np.int64)


def _cifar(root: Path, split: str, hundred: bool) -> tuple[np.ndarray, np.ndarray]:
    if hundred:
        folder, files, key, what = root / "cifar-100-python", [split], b"fine_labels", "CIFAR-100"
    else:
        folder = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        key, what = b"labels", "CIFAR-10"
    images, labels = [], []
    for name in files:
        batch = _read_pickle(folder / name, what)
        if b"data" not in batch or key not in batch:
            raise ValueError(
                f"{what}: {str(folder / name)!r} lacks b'data' or {key!r} (found keys "
                f"{sorted(batch)[:5]})."
            )
        data = np.asarray(batch[b"data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(
                f"{what}: {str(folder / name)!r} has data {data.dtype} {data.shape}; "
                "expected uint8 (N, 3072)."
            )
        where = f"{what}: {str(folder / name)!r}"
        batch_labels = _labels(batch[key], 0, 99 if hundred else 9, where)
        if len(batch_labels) != len(data):
            raise ValueError(f"{where} has {len(data)} images but {len(batch_labels)} labels.")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _svhn(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    path = root / f"{split}_32x32.mat"
    if not path.is_file():
        raise FileNotFoundError(
            f"SVHN: expected the file {str(path)!r} (the cropped-digits format "
            f"{split}_32x32.mat), which does not exist."
        )
    try:
        mat = loadmat(path)
    except (MatReadError, ValueError, TypeError, OSError) as exc:
        raise ValueError(f"SVHN: {str(path)!r} is not a readable .mat file ({exc}).") from None
    if "X" not in mat or "y" not in mat or mat["X"].ndim != 4 or mat["X"].shape[:3] != (32, 32, 3):
        raise ValueError(f"SVHN: {str(path)!r} needs X (32, 32, 3, N) and y (N, 1).")
    if mat["X"].dtype != np.uint8:
        raise ValueError(
            f"SVHN: {str(path)!r} has X of dtype {mat['X'].dtype}; expected uint8 pixels."
        )
    images = np.transpose(mat["X"], (3, 2, 0, 1))
    y = mat["y"].reshape(-1)
    labels = _labels(y, 1, 10, f"SVHN: {str(path)!r} (y)") % 10  # 10 is the digit 0
    return images, labels


def _digits(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=0.3, random_state=0, stratify=digits.target)
    chosen = np.sort(train if split == "train" else test)
    images = torch.tensor(digits.images[chosen] / 16.0, dtype=torch.float32)[:, None]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        images = images.clamp(0, 1)
    return images, torch.tensor(digits.target[chosen], dtype=torch.long)


def _imagenet(root: Path, split: str):
    from gdws_torch.io.imagefolder import ImageFolder

    folder = root / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"imagenet: expected the folder {str(folder)!r} (one sub-folder per class, "
            "e.g. n01440764/, holding its JPEG files), which does not exist; see "
            "docs/imagenet.md for the layout."
        )
    data = ImageFolder(folder)
    if len(data.classes) != _CLASSES["imagenet"]:
        raise ValueError(
            f"imagenet: {str(folder)!r} holds {len(data.classes)} class folders (e.g. "
            f"{data.classes[:3]}); expected the 1000 ILSVRC2012 synset folders, whose sorted "
            "order gives the labels 0..999 of ImageNet checkpoints."
        )
    return data


def load_dataset(
    name: str, root: str | os.PathLike | None = None, split: str = "test", *, size: int = 8
) -> Dataset:
    """A dataset as a ``TensorDataset`` of float pixels in ``[0, 1]`` and long labels.

    Parameters
    ----------
    name : {"cifar10", "cifar100", "svhn", "digits", "imagenet"}
    root : path-like, optional
        The folder holding the dataset's files (see the module docstring); not used for
        ``"digits"``.
    split : {"train", "test"}, default="test"
        For ``"imagenet"``, ``"test"`` reads ``<root>/val``.
    size : int, default=8
        ``"digits"`` only: side of the (bilinearly upsampled) images, e.g. 32.

    Returns
    -------
    torch.utils.data.TensorDataset
        ``(images (N, C, H, W) float32, labels (N,) int64)``. For ``"imagenet"``, a
        :class:`gdws_torch.io.imagefolder.ImageFolder` instead, which decodes each image
        when it is indexed (``(3, 224, 224)`` float32, int label).

    Raises
    ------
    FileNotFoundError
        A file is missing: the message names the file expected and where.
    ValueError
        A file is corrupt or not in the format; for ``"imagenet"``, a split folder
        without exactly 1000 class folders.
    """
    name, split = _check_name(name), _check_split(split)
    if name == "digits":
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an integer >= 8; got {size!r}.")
        return TensorDataset(*_digits(split, size))
    if root is None:
        raise ValueError(f"dataset {name!r} needs root: the folder holding its files.")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: the root folder {str(root)!r} does not exist.")
    if name == "imagenet":
        return _imagenet(root, split)
    if name == "svhn":
        images, labels = _svhn(root, split)
    else:
        images, labels = _cifar(root, split, hundred=name == "cifar100")
    if len(images) != len(labels):
        raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels.")
    pixels = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    return TensorDataset(pixels, torch.from_numpy(labels))
