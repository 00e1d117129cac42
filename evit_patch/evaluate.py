"""Evaluate a fine-tuned run: top-1/top-5, GMACs and images/s, patched and unpatched side by side.

    python -m evit_patch.evaluate runs/fashion_mnist            # folder with recipe.yaml + model.safetensors
    python -m evit_patch.evaluate runs/deit_s --weights model_ema.safetensors
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from torch import nn

from evit_patch import distributed
from evit_patch.checkpoint import load_weights
from evit_patch.config import ModelConfig, Recipe, RecipeError, recipe_from_dict
from evit_patch.data import build_dataset
from evit_patch.dynamicvit import apply_dynamicvit, is_dynamicvit, remove_dynamicvit
from evit_patch.evaluation import accuracy, images_per_second
from evit_patch.export import example_input
from evit_patch.macs import count_macs
from evit_patch.methods import apply_recipe_reducer, method_label
from evit_patch.patch import remove_evit
from evit_patch.structural import apply_pruned_shape
from evit_patch.training import build_model, eval_loader


def rebuild(recipe: Recipe, weights: Path) -> nn.Module:
    """The recipe's architecture (width-pruned to ``structural.shape`` when structural
    pruning is on) with DynamicViT or its token reducer applied and the saved weights
    (DynamicViT's predictors included) loaded."""
    model = build_model(ModelConfig(name=recipe.model.name, kwargs=recipe.model.kwargs))
    if recipe.structural.enabled:
        if recipe.structural.shape is None:
            raise RecipeError("structural.shape: a width-pruned run's recipe.yaml records the widths it was "
                              "pruned to; rebuild from that file")
        apply_pruned_shape(model, dataclasses.asdict(recipe.structural.shape))
    if recipe.dynamicvit.enabled:
        apply_dynamicvit(model, recipe.dynamicvit.layers, recipe.dynamicvit.keep_ratio)
    load_weights(model, weights)
    if recipe.evit.enabled:
        apply_recipe_reducer(model, recipe)
    return model.eval()


def _unpatched_copy(model: nn.Module) -> nn.Module:
    return remove_dynamicvit(copy.deepcopy(model)) if is_dynamicvit(model) else remove_evit(copy.deepcopy(model))


def table(models: dict[str, nn.Module], recipe: Recipe, runtime: distributed.Runtime) -> str:
    """Markdown rows of accuracy, GMACs and images/s (measured together, interleaved)."""
    loader = eval_loader(build_dataset(recipe.data, next(iter(models.values())), training=False), recipe, runtime)
    images = example_input(next(iter(models.values())), recipe.train.benchmark_batch_size).normal_()
    speed = images_per_second({n: m.to(runtime.device) for n, m in models.items()}, images.to(runtime.device))
    first = next(iter(models))
    lines = [f"| model | top-1 | top-5 | GMACs | images/s (batch {images.shape[0]}) | speed-up |",
             "|---|---|---|---|---|---|"]
    for name, model in models.items():
        scores = accuracy(model, loader, runtime)
        lines.append(f"| {name} | {scores['top1']:.2f} | {scores['top5']:.2f} | {count_macs(model) / 1e9:.3f} | "
                     f"{speed[name]:.0f} | {speed[name] / speed[first]:.2f}x |")
    return "\n".join(lines)


def compare_with_base(recipe: Recipe, weights: Path) -> str:
    """Base model (the recipe's starting weights) against it with the recipe's reducer, or
    width-pruned, before and after fine-tuning; or against the fine-tuned DynamicViT
    (untrained predictors would prune at random)."""
    runtime = distributed.Runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    base = build_model(recipe.model).eval()
    if recipe.dynamicvit.enabled:
        return table({"base (unpatched)": base, f"{method_label(recipe)}, fine-tuned": rebuild(recipe, weights)},
                     recipe, runtime)
    tuned = rebuild(recipe, weights)
    if recipe.structural.enabled:
        reduced = apply_pruned_shape(copy.deepcopy(base), dataclasses.asdict(recipe.structural.shape),
                                     importance=recipe.structural.importance)
    else:
        reduced = apply_recipe_reducer(copy.deepcopy(base), recipe)
    name = method_label(recipe)
    return table({"base (unpatched)": base, f"{name}, not fine-tuned": reduced, f"{name}, fine-tuned": tuned},
                 recipe, runtime)


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
    runtime = distributed.Runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    method = method_label(recipe)
    reduces_tokens = method is not None and not recipe.structural.enabled
    models = {"unpatched": _unpatched_copy(patched)} if reduces_tokens else {}
    models[method or "unpatched"] = patched
    print(table(models, recipe, runtime))


if __name__ == "__main__":
    main()
