"""Evaluate a fine-tuning run: top-1/top-5, GMACs and images/s, patched and unpatched side by side.

    python -m evit_patch.evaluate runs/fashion_mnist            # folder with recipe.yaml + model.safetensors
    python -m evit_patch.evaluate runs/deit_s --weights model_ema.safetensors
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from torch import nn

from evit_patch.core.lifecycle import detach
from evit_patch.core.model_info import example_images
from evit_patch.cost import count_macs
from evit_patch.tools.timing import images_per_second
from evit_patch.train import distributed
from evit_patch.train.assembly import rebuild
from evit_patch.train.data import build_dataset
from evit_patch.train.loaders import eval_loader
from evit_patch.train.methods import method_label, recipe_method, reduces_tokens
from evit_patch.train.metrics import accuracy
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import Recipe, recipe_from_dict


def table(models: dict[str, nn.Module], recipe: Recipe, runtime: distributed.Runtime) -> str:
    """Markdown rows of accuracy, GMACs and images/s (measured together, interleaved)."""
    first_model = next(iter(models.values()))
    loader = eval_loader(build_dataset(recipe.data, first_model, training=False), recipe, runtime)
    images = example_images(first_model, recipe.train.benchmark_batch_size, seed=0)
    speed = images_per_second({n: m.to(runtime.device) for n, m in models.items()}, images.to(runtime.device))
    first = next(iter(models))
    lines = [f"| model | top-1 | top-5 | GMACs | images/s (batch {images.shape[0]}) | speed-up |",
             "|---|---|---|---|---|---|"]
    for name, model in models.items():
        scores = accuracy(model, loader, runtime)
        lines.append(f"| {name} | {scores['top1']:.2f} | {scores['top5']:.2f} | {count_macs(model) / 1e9:.3f} | "
                     f"{speed[name]:.0f} | {speed[name] / speed[first]:.2f}x |")
    return "\n".join(lines)


def _runtime() -> distributed.Runtime:
    return distributed.Runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def compare_with_base(recipe: Recipe, weights: Path) -> str:
    """Base model (the recipe's starting weights) against it with the recipe's method, before
    and after fine-tuning; or against the fine-tuned DynamicViT only (untrained
    predictors would prune at random)."""
    base = build_model(recipe.model).eval()
    method = recipe_method(recipe)
    name = method_label(recipe)
    tuned = rebuild(recipe, weights)
    models = {"base (unpatched)": base}
    if method.meaningful_untrained:
        models[f"{name}, not fine-tuned"] = method.apply(copy.deepcopy(base), recipe, None, None)
    models[f"{name}, fine-tuned"] = tuned
    return table(models, recipe, _runtime())


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="output folder of a fine-tuning run")
    parser.add_argument("--weights", default="model.safetensors", help="weights file in the run folder")
    args = parser.parse_args(argv)
    recipe_file = args.run / "recipe.yaml"
    if not recipe_file.is_file():
        parser.exit(2, f"error: {recipe_file} not found; pass the output folder of a fine-tuning run\n")
    recipe = recipe_from_dict(yaml.safe_load(recipe_file.read_text()))
    patched = rebuild(recipe, args.run / args.weights)
    label = method_label(recipe)
    models = {"unpatched": detach(copy.deepcopy(patched))} if reduces_tokens(recipe) else {}
    models[label or "unpatched"] = patched
    print(table(models, recipe, _runtime()))


if __name__ == "__main__":
    main()
