"""Garment segmentation on Fashion-MNIST: dense features of reduced models, side by side.

    python benchmarks/dense.py --out benchmarks/results/dense_fashion_mnist

The mask of an image is its own garment: pixels brighter than ``--threshold`` of full
scale (0.1 by default; the background is black). The backbone is the shipped base ViT
(``recipes/fashion_mnist.yaml``'s model, 2x2 patches, 14x14 grid; ``--recipe`` another's), frozen; the head is
linear: a 1x1 convolution from the last block's normed features (timm's
``forward_intermediates(..., norm=True)``) to two logits for each of the 2x2 pixels of its
patch, so every pixel is predicted from its own patch's feature alone and a bad
restoration cannot be hidden by neighbours.

The head is trained on the unpatched model's features (``--epochs``); each variant is
evaluated with it as it is ("off the shelf") and after ``--finetune-epochs`` more epochs
on that variant's own features, starting from it (the unpatched row gets the same extra
epochs on its own features, so the budgets are equal). Variants: unpatched; EViT at
each keep rate with each restoration fill (``source``: the fused token; ``carry``: the
patch's own feature from when it was last kept; ``nearest``: the nearest kept patch on
the grid; ``similar``: the kept patch nearest in feature space; ``zeros``: holes left
empty, i.e. no restoration); ToMe-style merging at the same token
counts with unmerge (``source``). mIoU is the mean of the background and garment IoU over
the test images, in %.

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (test images, their masks, the
predictions of three variants and the kept-token map of EViT at the first keep rate).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import evit_patch
from evit_patch.reducers import ToMeMerge
from evit_patch.tools.results import write_results
from evit_patch.train.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "fashion_mnist.yaml"
CLASSES = 2  # background, garment


@dataclass
class Variant:
    """One model setting and what it scored."""

    label: str
    method: str  # unpatched, evit, tome
    keep_rate: float
    fill: Optional[str]
    gmacs: float = 0.0
    miou_off_the_shelf: float = 0.0
    miou_finetuned: float = 0.0
    iou_finetuned: tuple[float, ...] = ()


def garment_masks(images: Tensor, threshold: float) -> Tensor:
    """``(B, H, W)`` long: 1 where the pixel (0..1 after undoing the normalization) is above ``threshold``."""
    return ((images[:, 0] * FASHION_MNIST_STD[0] + FASHION_MNIST_MEAN[0]) > threshold).long()


def segmentation_head(channels: int, patch: int) -> nn.Module:
    """Two logits for each pixel of a patch, from that patch's feature alone."""
    return nn.Sequential(nn.Conv2d(channels, CLASSES * patch * patch, 1), nn.PixelShuffle(patch))


def variants(keep_rates: list[float], fills: list[str]) -> list[Variant]:
    rows = [Variant("unpatched", "unpatched", 1.0, None)]
    for rate in keep_rates:
        for fill in fills:
            name = "no restoration (holes empty)" if fill == "zeros" else f"restoration: {fill}"
            rows.append(Variant(f"EViT {rate}, {name}", "evit", rate, fill))
        rows.append(Variant(f"ToMe {rate}, unmerge", "tome", rate, "source"))
    return rows


def patched(base: nn.Module, variant: Variant, layers: list[int]) -> nn.Module:
    model = copy.deepcopy(base)
    if variant.method == "evit":
        evit_patch.apply_evit(model, layers, variant.keep_rate)
    elif variant.method == "tome":
        evit_patch.apply_token_reducer(model, layers, variant.keep_rate, ToMeMerge())
    if variant.fill is not None:
        evit_patch.set_restoration(model, variant.fill)
    return model.eval()


@torch.no_grad()
def features(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """The last block's normed features on the full grid, ``(B, C, rows, cols)`` in float16."""
    last = len(model.blocks) - 1
    return torch.cat([
        model.forward_intermediates(images[i:i + batch_size], indices=[last], norm=True, intermediates_only=True)[0]
        .half() for i in range(0, len(images), batch_size)])


def train_head(head: nn.Module, feats: Tensor, masks: Tensor, epochs: int, lr: float, batch_size: int,
               seed: int) -> nn.Module:
    """AdamW with a cosine schedule on cached features."""
    if epochs == 0:
        return head
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(feats) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = torch.randperm(len(feats), generator=generator)
        for i in range(0, len(feats), batch_size):
            index = order[i:i + batch_size]
            loss = F.cross_entropy(head(feats[index].float()), masks[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return head


@torch.no_grad()
def iou(head: nn.Module, feats: Tensor, masks: Tensor, batch_size: int) -> list[float]:
    """IoU of each class over all pixels of the test images, in %."""
    intersection, union = torch.zeros(CLASSES), torch.zeros(CLASSES)
    for i in range(0, len(feats), batch_size):
        prediction = head(feats[i:i + batch_size].float()).argmax(dim=1)
        target = masks[i:i + batch_size]
        for c in range(CLASSES):
            intersection[c] += ((prediction == c) & (target == c)).sum()
            union[c] += ((prediction == c) | (target == c)).sum()
    return (100 * intersection / union.clamp(min=1)).tolist()


@torch.no_grad()
def predictions(head: nn.Module, feats: Tensor) -> Tensor:
    return head(feats.float()).argmax(dim=1)


def markdown(rows: list[Variant], setup: dict) -> str:
    lines = [
        f"Fashion-MNIST garment segmentation (pixels above {setup['threshold']} of full scale), linear head on the "
        f"frozen base ViT's last block; {setup['train_images']} training / {setup['test_images']} test images; head "
        f"{setup['epochs']} epochs on unpatched features, then {setup['finetune_epochs']} epochs on each variant's own. "
        f"mIoU in % (background and garment).",
        "",
        "| variant | GMACs | mIoU off the shelf | mIoU head fine-tuned | IoU background / garment |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        background, garment = row.iou_finetuned
        lines.append(f"| {row.label} | {row.gmacs:.4f} | {row.miou_off_the_shelf:.2f} | {row.miou_finetuned:.2f} | "
                     f"{background:.2f} / {garment:.2f} |")
    return "\n".join(lines)


def plot(path: Path, images: Tensor, masks: Tensor, panels: dict[str, Tensor], kept_map: Tensor,
         kept_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["image", "garment mask", *panels, kept_label]
    figure, axes = plt.subplots(len(images), len(columns), figsize=(1.7 * len(columns), 1.8 * len(images)),
                                squeeze=False)
    for row in range(len(images)):
        pictures = [images[row, 0], masks[row], *(p[row] for p in panels.values()), kept_map[row]]
        for column, (title, picture) in enumerate(zip(columns, pictures)):
            axis = axes[row, column]
            colours = "viridis" if column == len(columns) - 1 else "gray"
            axis.imshow(picture.float().numpy(), cmap=colours, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(title, fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--test-images", type=int, default=5000)
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--fills", nargs="+", default=["carry", "source", "nearest", "similar", "zeros"],
                        choices=list(evit_patch.FILLS), help="the first is drawn in the picture")
    parser.add_argument("--threshold", type=float, default=0.1, help="garment pixels: intensity above this (0..1)")
    parser.add_argument("--epochs", type=int, default=8, help="head epochs on the unpatched model's features")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="head epochs on each variant's features")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe whose model is the backbone")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json, <out>.md and <out>.png")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> list[Variant]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    recipe = load_recipe(args.recipe)
    base = build_model(recipe.model).eval()
    layers = recipe.reduction.layers
    patch = base.patch_embed.patch_size[0]
    train, test = FashionMNIST("train"), FashionMNIST("test")
    train_images, test_images = train.images[:args.train_images], test.images[:args.test_images]
    train_masks = garment_masks(train_images, args.threshold)
    test_masks = garment_masks(test_images, args.threshold)
    rows = variants(args.keep_rates, args.fills)
    torch.manual_seed(0)
    shelf_head = segmentation_head(base.embed_dim, patch)
    shelf_head = train_head(shelf_head, features(base, train_images, args.batch_size), train_masks, args.epochs,
                            args.lr, args.batch_size, seed=0)
    shown = test_images[:6]
    panels: dict[str, Tensor] = {}
    kept_map = torch.zeros(0)
    for row in rows:
        model = patched(base, row, layers)
        row.gmacs = evit_patch.count_macs(model) / 1e9
        test_feats = features(model, test_images, args.batch_size)
        row.miou_off_the_shelf = sum(iou(shelf_head, test_feats, test_masks, args.batch_size)) / CLASSES
        head = train_head(copy.deepcopy(shelf_head), features(model, train_images, args.batch_size), train_masks,
                          args.finetune_epochs, args.finetune_lr, args.batch_size, seed=1)
        row.iou_finetuned = tuple(iou(head, test_feats, test_masks, args.batch_size))
        row.miou_finetuned = sum(row.iou_finetuned) / CLASSES
        print(f"{row.label}: {row.gmacs:.4f} GMACs, mIoU {row.miou_off_the_shelf:.2f} off the shelf, "
              f"{row.miou_finetuned:.2f} fine-tuned ({time.perf_counter() - started:.0f} s)", flush=True)
        first_rate = args.keep_rates[0]
        if row.method == "unpatched" or (row.method == "evit" and row.fill == args.fills[0] and row.keep_rate ==
                                         first_rate) or (row.method == "evit" and row.fill == "zeros"
                                                         and row.keep_rate == args.keep_rates[-1]):
            panels[row.label] = predictions(head, features(model, shown, args.batch_size))
        if row.method == "evit" and row.keep_rate == first_rate and not len(kept_map):
            model(shown)
            grid = tuple(base.patch_embed.grid_size)
            kept_map = evit_patch.kept_tokens(model)[-1].status.reshape(-1, *grid)
    setup = {"threshold": args.threshold, "train_images": len(train_images), "test_images": len(test_images),
             "epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "lr": args.lr,
             "finetune_lr": args.finetune_lr, "layers": layers, "keep_rates": args.keep_rates, "fills": args.fills,
             "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1),
             "checkpoint": recipe.model.checkpoint}
    table = markdown(rows, setup)
    print(table)
    if args.out:
        write_results(args.out, table, {"setup": setup, "results": [asdict(r) for r in rows]})
        kept_label = f"EViT {args.keep_rates[0]} after block {layers[-1]}: kept dark, fused light"
        plot(args.out.with_suffix(".png"), shown, test_masks[:6], panels, kept_map, kept_label)
    return rows


if __name__ == "__main__":
    main()
