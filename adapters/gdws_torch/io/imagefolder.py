"""ImageNet-style image folders, decoded with Pillow, without torchvision.

A root folder holds one sub-folder per class; the sorted folder names are the classes
``0 .. K-1`` (torchvision's ``ImageFolder`` convention, so labels agree with checkpoints
trained through it). Images are read with Pillow, converted to RGB and passed through the
standard evaluation transform: the shorter side resized to 256 (bilinear), a 224 x 224
centre crop, float pixels in ``[0, 1]`` of shape ``(3, 224, 224)``. Sizes and rounding
follow torchvision's ``Resize(256)``, ``CenterCrop(224)`` and ``ToTensor()`` on PIL images.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = [
    "IMG_EXTENSIONS",
    "ImageFolder",
    "center_crop",
    "eval_transform",
    "find_classes",
    "imagefolder_loader",
    "load_image",
    "make_samples",
    "resize_shorter_side",
    "to_tensor",
]

# torchvision's IMG_EXTENSIONS: files are matched case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Image.Resampling appeared in Pillow 9.1; the module constant works in every version.
_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return value


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is ``size`` (bilinear), keeping the aspect ratio.

    The longer side becomes ``int(size * long / short)``, as torchvision's
    ``Resize(size)``; an image whose shorter side is already ``size`` is returned as is.

    Parameters
    ----------
    image : PIL.Image.Image
    size : int

    Returns
    -------
    PIL.Image.Image
    """
    size = _check_size("size", size)
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize(new_size, _BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central ``size x size`` square, with torchvision's ``CenterCrop`` rounding.

    ``top = int(round((height - size) / 2.0))`` and likewise ``left``.

    Parameters
    ----------
    image : PIL.Image.Image
        At least ``size`` pixels on each side.
    size : int

    Returns
    -------
    PIL.Image.Image
    """
    size = _check_size("size", size)
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"cannot crop {size}x{size} from an image of {width}x{height}.")
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as float32 ``(3, H, W)`` in ``[0, 1]`` (torchvision's ``ToTensor``)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous().float().div_(255.0)


class _EvalTransform:
    """Picklable (for worker processes) resize-shorter-side, centre crop, to tensor."""

    def __init__(self, resize: int, crop: int) -> None:
        self.resize, self.crop = resize, crop

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(center_crop(resize_shorter_side(image, self.resize), self.crop))

    def __repr__(self) -> str:
        return f"eval_transform(resize={self.resize}, crop={self.crop})"


def eval_transform(resize: int = 256, crop: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """The standard ImageNet evaluation transform, without normalisation.

    Parameters
    ----------
    resize : int, default=256
        The shorter side after resizing.
    crop : int, default=224
        The side of the centre crop; at most ``resize``.

    Returns
    -------
    callable
        ``PIL.Image -> torch.Tensor (3, crop, crop)`` of float32 in ``[0, 1]``.
    """
    resize, crop = _check_size("resize", resize), _check_size("crop", crop)
    if crop > resize:
        raise ValueError(f"crop must be at most resize; got crop={crop}, resize={resize}.")
    return _EvalTransform(resize, crop)


def find_classes(root: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
    """The class folders of ``root``, sorted, and their indices (torchvision's rule)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder: the root {str(root)!r} does not exist.")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(
            f"image folder: {str(root)!r} holds no class folders; expected one sub-folder "
            "per class (e.g. n01440764/) holding that class's images."
        )
    return classes, {name: index for index, name in enumerate(classes)}


def make_samples(root: str | os.PathLike, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image, class by class, paths sorted within a class.

    Each class folder is walked recursively (following links), as torchvision does.
    """
    samples, empty = [], []
    for name in sorted(class_to_idx, key=class_to_idx.__getitem__):
        found = 0
        for folder, _, files in sorted(os.walk(Path(root) / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(folder, file), class_to_idx[name]))
                    found += 1
        if not found:
            empty.append(name)
    if empty:
        raise FileNotFoundError(
            f"image folder {str(root)!r}: no image files in the class folder(s) {empty[:5]}"
            f"{' ...' if len(empty) > 5 else ''} (extensions {', '.join(IMG_EXTENSIONS)})."
        )
    return samples


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` decoded by Pillow and converted to RGB.

    Raises
    ------
    ValueError
        The file cannot be decoded (truncated, not an image): the message names it.
    """
    try:
        with open(path, "rb") as f, Image.open(f) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode the image {str(path)!r}: {exc}") from None


class ImageFolder(Dataset):
    """Images in class folders as ``(tensor (3, crop, crop) in [0, 1], class index)``.

    Parameters
    ----------
    root : path-like
        A folder with one sub-folder per class. Classes are the sorted folder names
        (indices ``0 .. K-1``); images are the files with an extension in
        ``IMG_EXTENSIONS`` (any case) anywhere under a class folder, in sorted order.
    resize : int, default=256
        The shorter side after resizing (bilinear).
    crop : int, default=224
        The side of the centre crop.
    transform : callable, optional
        Replaces the evaluation transform: ``PIL.Image (RGB) -> torch.Tensor``.

    Attributes
    ----------
    classes : list of str
    class_to_idx : dict of str to int
    samples : list of (str, int)
        ``(path, class index)``, in the dataset's order.
    targets : list of int
        The class index of each sample.

    Raises
    ------
    FileNotFoundError
        ``root`` is missing, holds no class folder, or a class folder holds no image.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resize: int = 256,
        crop: int = 224,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable; got {type(transform).__name__}.")
        self.transform = eval_transform(resize, crop) if transform is None else transform
        self.root = str(root)
        self.classes, self.class_to_idx = find_classes(root)
        self.samples = make_samples(root, self.class_to_idx)
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_image(path)), label

    def __repr__(self) -> str:
        return (
            f"ImageFolder({self.root!r}: {len(self.samples)} images, {len(self.classes)} "
            f"classes, {self.transform!r})"
        )


def imagefolder_loader(
    data: ImageFolder | str | os.PathLike,
    batch_size: int = 64,
    num_workers: int | None = None,
    n_samples: int | None = None,
    **folder_options,
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` over an image folder, in a fixed order.

    Parameters
    ----------
    data : ImageFolder or path-like
        A dataset, or the root of one (``folder_options`` go to :class:`ImageFolder`).
    batch_size : int, default=64
    num_workers : int, optional
        Worker processes decoding images; default ``min(4, os.cpu_count())``; 0 decodes
        in the calling process. The batches are the same for any value.
    n_samples : int, optional
        Only ``n_samples`` images, evenly spaced over the dataset (so all classes are
        represented, not just the first ones): the middle of each of ``n_samples`` equal
        slices, indices ``(2 i + 1) * len // (2 n_samples)``.

    Returns
    -------
    torch.utils.data.DataLoader
        Batches ``(images (B, 3, crop, crop) float32, labels (B,) int64)``, unshuffled.
    """
    if not isinstance(data, Dataset):
        data = ImageFolder(data, **folder_options)
    elif folder_options:
        raise TypeError(f"options {sorted(folder_options)} only apply when data is a path.")
    batch_size = _check_size("batch_size", batch_size)
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0; got {num_workers!r}.")
    if n_samples is not None:
        n_samples = _check_size("n_samples", n_samples)
        if n_samples < len(data):
            indices = [(2 * i + 1) * len(data) // (2 * n_samples) for i in range(n_samples)]
            data = Subset(data, indices)
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
