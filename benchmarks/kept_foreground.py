"""How much of what EViT keeps is the object: the share of kept image tokens that cover
foreground, layer by layer, against the share of foreground among all patches (what a
random drop keeps on average). A number for what the kept-token maps show.

    python benchmarks/kept_foreground.py                                       # the embedded default's base
    python benchmarks/kept_foreground.py --set model.checkpoint=runs/fashion_mnist_pretrain_reg4/model.safetensors \\
        --set model.kwargs.reg_tokens=4 --label "4 register tokens"

Fashion-MNIST only: a patch is foreground when its mean pixel intensity is above
``--threshold`` (the background is black). Prints a Markdown table; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from evit_patch import DROPPED, FUSED, KEPT, apply_evit
from evit_patch.tools.visualize import patch_grid, status_maps
from evit_patch.train.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, build_dataset
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent


def foreground_patches(images: torch.Tensor, grid: tuple[int, int], threshold: float) -> torch.Tensor:
    """``(B, rows, cols)`` bool: patches whose mean intensity (0..1) is above ``threshold``."""
    intensity = images * FASHION_MNIST_STD[0] + FASHION_MNIST_MEAN[0]
    return F.adaptive_avg_pool2d(intensity.mean(dim=1), grid) > threshold


def kept_foreground(model: torch.nn.Module, batches, threshold: float) -> list[dict[str, float]]:
    """Per reorganization layer: kept tokens per image, the foreground share of kept,
    fused and dropped tokens, and of all patches."""
    grid = patch_grid(model)
    totals: list[dict[str, float]] = []
    for images in batches:
        foreground = foreground_patches(images, grid, threshold)
        with torch.no_grad():
            maps = status_maps(model, images)
        if not totals:
            totals = [{"images": 0, "kept": 0, "kept_fg": 0, "fused": 0, "fused_fg": 0, "all_fg": 0} for _ in maps]
        for total, status in zip(totals, maps):
            total["images"] += images.shape[0]
            total["kept"] += int((status == KEPT).sum())
            total["kept_fg"] += int(((status == KEPT) & foreground).sum())
            total["fused"] += int(((status == FUSED) | (status == DROPPED)).sum())
            total["fused_fg"] += int((((status == FUSED) | (status == DROPPED)) & foreground).sum())
            total["all_fg"] += int(foreground.sum())
    patches = grid[0] * grid[1]
    return [{"kept_per_image": t["kept"] / t["images"], "foreground_of_kept": t["kept_fg"] / t["kept"],
             "foreground_of_fused": t["fused_fg"] / max(t["fused"], 1),
             "foreground_of_all": t["all_fg"] / (t["images"] * patches)} for t in totals]


def markdown(label: str, layers: list[int], keep_rate: float, rows: list[dict[str, float]], images: int) -> str:
    lines = [f"{label}, EViT keep {keep_rate}, {images} test images: share of foreground patches among the image "
             "tokens each reorganization layer keeps, among those fused (or dropped) there or before, and among all "
             "patches (a random drop's expected share).", "",
             "| layer | image tokens kept | foreground among kept | among fused so far | among all patches |",
             "|---|---|---|---|---|"]
    for layer, row in zip(layers, rows):
        lines.append(f"| {layer} | {row['kept_per_image']:.0f} | {row['foreground_of_kept']:.1%} | "
                     f"{row['foreground_of_fused']:.1%} | {row['foreground_of_all']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "fashion_mnist.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE")
    parser.add_argument("--keep-rate", type=float, help="default: the recipe's")
    parser.add_argument("--images", type=int, default=2000, help="first N test images")
    parser.add_argument("--threshold", type=float, default=0.1, help="mean intensity (0..1) of a foreground patch")
    parser.add_argument("--label", default="base")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as error:
        print(f"kept_foreground.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    problem = ("--images: must be at least 1" if args.images < 1 else
               "--recipe: foreground is defined for Fashion-MNIST's black background only; use a Fashion-MNIST recipe"
               if recipe.data.dataset != "fashion_mnist" else None)
    if problem:
        print(f"kept_foreground.py: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    keep_rate = args.keep_rate or recipe.reduction.keep_rate
    model = apply_evit(build_model(recipe.model).eval(), recipe.reduction.layers, keep_rate, fuse=recipe.reduction.fuse)
    dataset = build_dataset(recipe.data, model, training=False)
    count = min(args.images, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(count)])
    table = markdown(args.label, recipe.reduction.layers, keep_rate,
                     kept_foreground(model, images.split(250), args.threshold), count)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
