"""A tiny Fashion-MNIST fine-tuning recipe for tests (seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import yaml

from evit_patch.train.recipe import Recipe, load_recipe

TINY = {
    "model": {"name": "vit_tiny_patch16_224",
              "kwargs": {"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10,
                         "embed_dim": 32, "depth": 3, "num_heads": 2}},
    "reduction": {"layers": [1], "keep_rate": 0.5},
    "data": {"dataset": "fashion_mnist", "train_subset": 256, "eval_subset": 128},
    "optimizer": {"lr": 8.0e-2, "min_lr": 1.0e-4, "weight_decay": 0.0},
    "train": {"epochs": 2, "batch_size": 32, "max_steps_per_epoch": 4, "seed": 3, "eval_batch_size": 64},
}


def write_recipe(folder: Path, overrides: dict | None = None, name: str = "recipe.yaml") -> Path:
    values = yaml.safe_load(yaml.safe_dump(TINY))
    for section, entries in (overrides or {}).items():
        values.setdefault(section, {}).update(entries)
    values["train"].setdefault("output_dir", str(folder / "run"))
    path = folder / name
    path.write_text(yaml.safe_dump(values))
    return path


def tiny_recipe(folder: Path, overrides: dict | None = None) -> Recipe:
    return load_recipe(write_recipe(folder, overrides))
