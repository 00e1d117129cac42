"""Fine-tuning a transformers ViT with the same command line: a recipe names it with
``model.source: transformers`` (a model type and its config, or a checkpoint folder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from evit_patch.tools.evaluate import main as evaluate_main
from evit_patch.tools.finetune import main as finetune_main
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import load_recipe

transformers = pytest.importorskip("transformers")  # CI installs the extra; a plain install skips

CONFIG = {"image_size": 32, "patch_size": 8, "num_labels": 2, "hidden_size": 32, "num_hidden_layers": 3,
          "num_attention_heads": 2, "intermediate_size": 64}


def image_folder(root: Path, per_class: int = 24) -> Path:
    """Generated 32 px RGB images in train/ and val/, two classes told apart by brightness."""
    generator = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, base in (("dark", 50), ("light", 170)):
            (root / split / name).mkdir(parents=True)
            for index in range(per_class):
                pixels = np.clip(generator.normal(base, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{index}.png")
    return root


def write_recipe(folder: Path, model: dict, **sections: dict) -> Path:
    values = {
        "model": {"source": "transformers", **model},
        "reduction": {"layers": [1], "keep_rate": 0.5},
        "data": {"dataset": "imagefolder", "root": str(folder / "images")},
        "optimizer": {"lr": 5.0e-2, "min_lr": 1.0e-4, "weight_decay": 0.0},
        "train": {"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 3, "seed": 0, "eval_batch_size": 48,
                  "benchmark_batch_size": 4, "output_dir": str(folder / "run")},
    }
    for name, entries in sections.items():
        values[name].update(entries)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_transformers_vit_fine_tunes_through_the_command_line(tmp_path, capsys) -> None:
    """A few EViT steps on generated images: the loss is finite, the weights move, the run's
    weights are the model's own state_dict, and evaluate rebuilds the patched model."""
    image_folder(tmp_path / "images")
    recipe = write_recipe(tmp_path, {"name": "vit", "kwargs": CONFIG})
    finetune_main([str(recipe), "--no-report"])
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and all(np.isfinite(m["train_loss"]) for m in metrics)
    saved = load_file(str(run / "model.safetensors"))
    torch.manual_seed(0)
    fresh = transformers.ViTForImageClassification(transformers.ViTConfig(**CONFIG))
    assert set(saved) == set(fresh.state_dict())
    start = build_model(load_recipe(recipe).model)  # the run's seeded start
    moved = [key for key, value in start.state_dict().items() if not torch.equal(value, saved[key])]
    assert any(key.startswith("vit.layers.1.attention.") for key in moved), moved
    evaluate_main([str(run)])
    printed = capsys.readouterr().out
    assert "| unpatched |" in printed and "| EViT keep 0.5 |" in printed


def test_a_checkpoint_folder_is_loaded_with_its_weights(tmp_path) -> None:
    torch.manual_seed(3)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**CONFIG))
    model.save_pretrained(tmp_path / "checkpoint")
    image_folder(tmp_path / "images", per_class=1)
    built = build_model(load_recipe(write_recipe(tmp_path, {"name": str(tmp_path / "checkpoint")})).model)
    assert type(built) is type(model)
    assert all(torch.equal(value, built.state_dict()[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("model, sections, message", [
    ({"name": "no_such_type"}, {}, "model.name: 'no_such_type' is neither a checkpoint folder nor a transformers "
                                   "model type"),
    ({"name": "vit", "kwargs": CONFIG, "pretrained": True}, {}, "model.pretrained: a transformers model's weights "
                                                                "come from its checkpoint folder"),
    ({"name": "vit", "kwargs": CONFIG}, {"reduction": {"layers": [3]}}, "reduction.layers"),
    ({"name": "vit", "kwargs": CONFIG, "source": "hub"}, {}, "model.source: 'hub' is not one of"),
])
def test_a_bad_transformers_recipe_is_one_line_before_any_work(tmp_path, capsys, no_work, model, sections,
                                                               message) -> None:
    image_folder(tmp_path / "images", per_class=1)
    with pytest.raises(SystemExit) as stopped:
        finetune_main([str(write_recipe(tmp_path, model, **sections)), "--no-report"])
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2
    assert message in error and "\n" not in error and "Traceback" not in error
    assert not (tmp_path / "run").exists()
