"""Draw which patches each reorganization layer kept, fused or dropped (the paper's figure).

    python -m evit_patch.visualize --model deit_small_patch16_224 --checkpoint w.safetensors \\
        --layers 3 6 9 --keep-rate 0.7 --image cat.jpg --out kept.png
    python -m evit_patch.visualize --run runs/fashion_mnist --fashion-mnist 0 1 2 --scale 8

The PNG is a row of panels: the input, then one panel per layer in which kept patches
show the image, fused patches are dimmed and tinted blue, and dropped patches are grey.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import timm
import torch
import yaml
from PIL import Image
from torch import nn

from evit_patch.core.lifecycle import is_patched
from evit_patch.core.model_info import native_input_shape
from evit_patch.core.provenance import DROPPED, FUSED, kept_tokens
from evit_patch.errors import CheckpointError, UnsupportedModelError
from evit_patch.reducers import apply_evit
from evit_patch.tools.evaluate import check_run_folder, read_run_recipe
from evit_patch.tools.file_faults import file_fault
from evit_patch.train.assembly import rebuild
from evit_patch.train.checkpoint import load_weights
from evit_patch.train.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST
from evit_patch.train.messages import one_line
from evit_patch.train.recipe import RecipeError

FUSED_TINT = np.array([40, 90, 255], dtype=np.float32)
DROPPED_GREY = 128  # not black: a kept patch of a dark background must not look dropped
PANEL_GAP = 4


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """Rows and columns of patches (timm's ``patch_embed.grid_size``)."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise ValueError("the model's patch_embed has no grid_size; cannot place tokens on the image")
    return int(grid[0]), int(grid[1])


@torch.no_grad()
def status_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Run a patched model and return, per layer, ``(B, rows, cols)`` KEPT/FUSED/DROPPED."""
    rows, cols = patch_grid(model)
    model(images)
    return [layer.status.reshape(-1, rows, cols) for layer in kept_tokens(model)]


def render(image: np.ndarray, statuses: Sequence[torch.Tensor], scale: int = 1) -> np.ndarray:
    """A ``uint8`` RGB strip: ``image`` (H, W, 3 uint8), then one panel per status map."""
    image = np.kron(image, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else image
    height, width = image.shape[:2]
    panels = [image]
    for status in statuses:
        rows, cols = status.shape
        per_pixel = np.kron(status.cpu().numpy(), np.ones((height // rows, width // cols), dtype=np.int64))
        panel = image.astype(np.float32)
        fused = per_pixel == FUSED
        panel[fused] = 0.4 * panel[fused] + 0.6 * FUSED_TINT
        panel[per_pixel == DROPPED] = DROPPED_GREY
        panels.append(panel.round().astype(np.uint8))
    gap = np.full((height, PANEL_GAP, 3), 255, dtype=np.uint8)
    strip = [part for panel in panels for part in (panel, gap)][:-1]
    return np.concatenate(strip, axis=1)


def display_image(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the input normalization of a ``(C, H, W)`` tensor into an RGB ``uint8`` array."""
    mean_t = torch.tensor(mean).view(-1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1)
    pixels = (tensor.cpu() * std_t + mean_t).clamp(0, 1).mul(255).round().byte()
    pixels = pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels[:3]
    return pixels.permute(1, 2, 0).numpy()


def load_image(path: Path, model: nn.Module) -> tuple[torch.Tensor, np.ndarray]:
    """The model's eval transform of an image file, and the same crop for display."""
    config = timm.data.resolve_data_config({"input_size": native_input_shape(model)}, model=model)
    transform = timm.data.create_transform(**config)
    mode = "L" if config["input_size"][0] == 1 else "RGB"
    tensor = transform(Image.open(path).convert(mode))
    return tensor, display_image(tensor, config["mean"], config["std"])


def parse_model_args(pairs: Sequence[str]) -> dict:
    parsed = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            raise ValueError(f"--model-arg expects key=value, got {pair!r}")
        parsed[key] = yaml.safe_load(value)
    return parsed


def _model(args: argparse.Namespace) -> nn.Module:
    """A patched model: rebuilt from a fine-tuning run, or a timm name plus weights."""
    if args.run:
        return rebuild(read_run_recipe(args.run / "recipe.yaml"), args.run / "model.safetensors")
    model = timm.create_model(args.model, pretrained=args.pretrained, **parse_model_args(args.model_arg)).eval()
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    if not is_patched(model):
        apply_evit(model, args.layers, args.keep_rate, fuse=not args.no_fuse)
    return model


def _inputs(args: argparse.Namespace, model: nn.Module) -> list[tuple[torch.Tensor, np.ndarray]]:
    if args.image:
        return [load_image(args.image, model)]
    test = FashionMNIST("test")
    return [(test[i][0], display_image(test[i][0], FASHION_MNIST_MEAN, FASHION_MNIST_STD)) for i in args.fashion_mnist]


def _check_sources(args: argparse.Namespace) -> str | None:
    """Why the run folder or image given cannot be drawn from, or None; before any model is built."""
    if args.run:
        return check_run_folder(args.run, "model.safetensors")
    if args.image and args.image.is_dir():
        return f"--image {str(args.image)!r} is a folder; pass a PNG or JPEG file"
    if args.image and not args.image.exists():
        return f"--image {str(args.image)!r} does not exist"
    return None


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="output folder of a fine-tuning run (recipe.yaml + model.safetensors)")
    parser.add_argument("--model", help="timm model name (when not --run)")
    parser.add_argument("--model-arg", action="append", default=[], help="create_model keyword, key=value")
    parser.add_argument("--checkpoint", type=Path, help="weights (.safetensors, a .pth state_dict or a timm "
                        "train.py checkpoint)")
    parser.add_argument("--pretrained", action="store_true", help="timm's hub weights for --model")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="blocks that reorganize (default: the paper's placement for the depth, DeiT: 3 6 9)")
    parser.add_argument("--keep-rate", type=float, default=0.7)
    parser.add_argument("--no-fuse", action="store_true")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="PNG or JPEG file")
    source.add_argument("--fashion-mnist", type=int, nargs="+", metavar="INDEX", help="Fashion-MNIST test images")
    parser.add_argument("--scale", type=int, default=1, help="integer upscaling of the drawing")
    parser.add_argument("--out", type=Path, default=Path("kept_tokens.png"))
    args = parser.parse_args(argv)
    if not (args.run or args.model):
        parser.error("give --run DIR (a fine-tuning run) or --model NAME with --checkpoint FILE or --pretrained")
    if args.model and not (args.run or args.checkpoint or args.pretrained):
        parser.error(f"--model {args.model} has random weights without --checkpoint FILE or --pretrained, and a "
                     "random model's kept tokens say nothing; give one of them")

    problem = _check_sources(args)
    if problem is not None:
        parser.exit(2, f"error: {problem}\n")
    try:
        model = _model(args)
        inputs = _inputs(args, model)
    except RecipeError as error:
        parser.exit(2, f"error: {one_line(error)}\n")
    except (CheckpointError, UnsupportedModelError, ValueError) as error:
        parser.exit(1, f"error: {one_line(error)}\n")
    except OSError as error:  # an image PIL cannot read, Fashion-MNIST files not found
        parser.exit(1, f"error: {file_fault(error)}\n")
    rows = []
    for tensor, shown in inputs:
        statuses = [maps[0] for maps in status_maps(model, tensor.unsqueeze(0))]
        rows.append(render(shown, statuses, args.scale))
    spacer = np.full((PANEL_GAP, rows[0].shape[1], 3), 255, dtype=np.uint8)
    Image.fromarray(np.concatenate([part for row in rows for part in (row, spacer)][:-1])).save(args.out)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
