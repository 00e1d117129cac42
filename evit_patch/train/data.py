"""Datasets for fine-tuning: Fashion-MNIST found on disk, or an ImageNet-style folder."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional

import numpy as np
import timm.data
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from evit_patch.core.model_info import native_input_shape
from evit_patch.train.recipe import DataConfig

FASHION_MNIST_DIRS = [Path("/usr/share/datasets/fashion-mnist")]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): big-endian dims after a 4-byte magic number."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for candidate in (folder / f"{stem}.gz", folder / stem, folder / "FashionMNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    return None


class FashionMNIST(Dataset):
    """Fashion-MNIST as normalized ``(1, 28, 28)`` float tensors, read from IDX files."""

    def __init__(self, split: str, root: Optional[str] = None, download: bool = False) -> None:
        if split not in FASHION_MNIST_FILES:
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        folders = [Path(root)] if root else FASHION_MNIST_DIRS
        images_stem, labels_stem = FASHION_MNIST_FILES[split]
        folder = next((f for f in folders if _find_idx(f, images_stem) and _find_idx(f, labels_stem)), None)
        if folder is None and download:
            import torchvision

            folder = Path(root or "data/fashion-mnist")
            torchvision.datasets.FashionMNIST(str(folder), train=split == "train", download=True)
        if folder is None:
            raise FileNotFoundError(
                f"Fashion-MNIST {split} files not found in {[str(f) for f in folders]}: install them with "
                "`apt-get install -y dataset-fashion-mnist`, point data.root at a folder of the IDX files, "
                "or set data.download: true"
            )
        images = torch.from_numpy(_read_idx(_find_idx(folder, images_stem)).copy())
        self.labels = torch.from_numpy(_read_idx(_find_idx(folder, labels_stem)).astype(np.int64))
        mean, std = FASHION_MNIST_MEAN[0], FASHION_MNIST_STD[0]
        self.images = ((images.float() / 255 - mean) / std).unsqueeze(1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def _imagefolder(config: DataConfig, split: str, model: nn.Module, training: bool) -> Dataset:
    if not config.root:
        raise ValueError("data.root must name a folder with one sub-folder per split (e.g. train/ and val/)")
    folder = Path(config.root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist (data.root / split)")
    transform = timm.data.create_transform(**image_transform_args(config, model, training))
    return timm.data.create_dataset("", root=str(folder), transform=transform)


def image_transform_args(config: DataConfig, model: nn.Module, training: bool) -> dict:
    """The arguments of timm's ``create_transform`` for an image-folder split: the model's
    input size, interpolation, mean and std, the recipe's augmentation for training, and
    the recipe's centre crop (``data.crop_pct``) or the model's for evaluation."""
    overrides = {"input_size": native_input_shape(model)}
    if config.crop_pct is not None:
        overrides["crop_pct"] = config.crop_pct
    data_config = timm.data.resolve_data_config(overrides, model=model)
    if not training:
        return {**data_config, "is_training": False}
    return {**data_config, "is_training": True, "auto_augment": config.auto_augment,
            "re_prob": config.random_erasing, "re_mode": config.random_erasing_mode}


def build_dataset(config: DataConfig, model: nn.Module, training: bool) -> Dataset:
    """The training or evaluation split named by the recipe, subset if asked."""
    if config.dataset == "fashion_mnist":
        split = "train" if training else "test"
        dataset: Dataset = FashionMNIST(split, config.root, config.download)
    else:
        dataset = _imagefolder(config, config.train_split if training else config.eval_split, model, training)
    limit = config.train_subset if training else config.eval_subset
    return Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset
