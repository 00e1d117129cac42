"""Evaluate a fine-tuning run: top-1/top-5, GMACs and images/s, patched and unpatched side by side.

    python -m evit_patch.evaluate runs/fashion_mnist            # folder with recipe.yaml + model.safetensors
    python -m evit_patch.evaluate runs/deit_s --weights model_ema.safetensors

Exit status 2: not a finished run's folder, or its recipe.yaml is not a valid recipe;
1: weights that cannot be read or do not fit, missing data, an unsupported model. Each
is one line.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from evit_patch.core.lifecycle import detach
from evit_patch.core.model_info import example_images
from evit_patch.cost import count_macs
from evit_patch.errors import CheckpointError, UnsupportedModelError
from evit_patch.train import distributed
from evit_patch.train.assembly import rebuild
from evit_patch.train.data import build_dataset
from evit_patch.train.loaders import eval_loader
from evit_patch.train.messages import one_line
from evit_patch.train.methods import method_label, recipe_method, runs_on_fewer_tokens
from evit_patch.train.metrics import accuracy
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import Recipe, RecipeError, check_values, parse_yaml, recipe_from_dict
from evit_patch.tuning.timing import paired_speeds, spread_warning


def table(models: dict[str, nn.Module], recipe: Recipe, runtime: distributed.Runtime,
          same_as: Optional[dict[str, str]] = None) -> str:
    """Markdown rows of accuracy, GMACs and images/s, the speed-up paired with the first model
    repeat by repeat (:func:`~evit_patch.tuning.timing.paired_speeds`; models in ``same_as``
    share the figure of the one named there), and a warning line when the repeats scatter."""
    first_model = next(iter(models.values()))
    loader = eval_loader(build_dataset(recipe.data, first_model, training=False), recipe, runtime)
    images = example_images(first_model, recipe.train.benchmark_batch_size, seed=0)
    speeds = paired_speeds({n: m.to(runtime.device) for n, m in models.items()}, images.to(runtime.device),
                           same_as=same_as)
    lines = [f"| model | top-1 | top-5 | GMACs | images/s (batch {images.shape[0]}) | speed-up (quartiles) |",
             "|---|---|---|---|---|---|"]
    for name, model in models.items():
        scores = accuracy(model, loader, runtime)
        speed = speeds[name]
        lines.append(f"| {name} | {scores['top1']:.2f} | {scores['top5']:.2f} | {count_macs(model) / 1e9:.3f} | "
                     f"{speed.images_per_second:.0f} | {speed.speedup:.2f}x ({speed.quartiles[0]:.2f}-"
                     f"{speed.quartiles[1]:.2f}) |")
    warning = spread_warning(speeds)
    return "\n".join(lines + ([warning] if warning else []))


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
    same_as = {}
    if method.meaningful_untrained:
        models[f"{name}, not fine-tuned"] = method.apply(copy.deepcopy(base), recipe, None, None)
        same_as[f"{name}, fine-tuned"] = f"{name}, not fine-tuned"  # one architecture, one speed
    models[f"{name}, fine-tuned"] = tuned
    return table(models, recipe, _runtime(), same_as)


def read_run_recipe(path: Path) -> Recipe:
    """A run's ``recipe.yaml``, parsed and range-checked like a recipe (its weight and data
    files are not required: evaluation needs neither the starting weights nor the
    training split)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as error:
        raise RecipeError(f"cannot be read ({type(error).__name__})") from None
    values = parse_yaml(text, "it")
    recipe = recipe_from_dict(values if values is not None else {})
    check_values(recipe)
    return recipe


def check_run_folder(run: Path, weights: str) -> Optional[str]:
    """Why ``run`` is not a finished run to evaluate, or None."""
    if not run.is_dir():
        return f"{str(run)!r} is not a folder; pass the output folder of a fine-tuning run"
    if not (run / "recipe.yaml").is_file():
        return f"{str(run / 'recipe.yaml')!r} not found; pass the output folder of a fine-tuning run"
    if not (run / weights).is_file():
        resume = (f"; the folder has a checkpoint.pth: if the run was interrupted, finish it with evit-finetune "
                  f"{run / 'recipe.yaml'} --resume {run / 'checkpoint.pth'}") if (run / "checkpoint.pth").is_file() else ""
        return f"{str(run / weights)!r} not found: a run writes it when its last epoch ends{resume}"
    return None


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="output folder of a fine-tuning run")
    parser.add_argument("--weights", default="model.safetensors", help="weights file in the run folder")
    args = parser.parse_args(argv)
    problem = check_run_folder(args.run, args.weights)
    if problem is not None:
        parser.exit(2, f"error: {problem}\n")
    try:
        recipe = read_run_recipe(args.run / "recipe.yaml")
    except RecipeError as error:
        parser.exit(2, f"error: {str(args.run / 'recipe.yaml')!r} is not a valid run recipe: {one_line(error)}\n")
    try:
        patched = rebuild(recipe, args.run / args.weights)
        label = method_label(recipe)
        models = {"unpatched": detach(copy.deepcopy(patched))} if runs_on_fewer_tokens(recipe) else {}
        models[label or "unpatched"] = patched
        print(table(models, recipe, _runtime()))
    except RecipeError as error:
        parser.exit(2, f"error: {one_line(error)}\n")
    except (CheckpointError, UnsupportedModelError, FileNotFoundError) as error:
        parser.exit(1, f"error: {one_line(error)}\n")


if __name__ == "__main__":
    main()
