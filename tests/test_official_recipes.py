"""The paper recipes train as the official scripts do: each one, resolved by
``finetune --dry-run --world-size 8``, carries every value of its table in
docs/recipes.md (which cites the official file and line), and the training loop steps
the new schedule keys as the official loops do."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import timm.scheduler
import torch
import yaml
from finetune_helpers import tiny_recipe

import evit_patch.train.loop as loop
from evit_patch.tools.finetune import main as finetune_main
from evit_patch.train.distributed import Runtime
from evit_patch.train.loaders import train_sampler
from evit_patch.train.optim import build_scheduler

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "recipes.md"
PAPER_RECIPES = ["deit_s", "deit_b", "deit_s_hires", "dynamicvit_deit_s", "lvvit"]


def doc_tables() -> dict[str, list[dict[str, str]]]:
    """``{recipe name: rows}`` from the tables under each ``### `recipes/NAME.yaml` `` heading."""
    tables: dict[str, list[dict[str, str]]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"^### `recipes/(\w+)\.yaml`", line)
        if heading:
            current = tables.setdefault(heading.group(1), [])
        elif current is not None and line.startswith("| `"):
            key, ours, official, source, note = (cell.strip() for cell in line.strip().strip("|").split("|"))
            current.append({"key": key.strip("`"), "ours": ours, "official": official, "source": source,
                            "note": note})
    return tables


def value(cell: str) -> Any:
    """A table cell as YAML (``8.0e-5`` and ``2e-5`` both as numbers)."""
    parsed = yaml.safe_load(cell.strip("`"))
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def same(a: Any, b: Any) -> bool:
    """Equal, numbers to 6 significant digits (the dry run rounds lrs so)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-5)
    return a == b


def resolved(document: dict, key: str) -> Any:
    """``implied.x.y`` from the dry run's ``implied``, any other key from its ``recipe``;
    a number part indexes a list."""
    parts = key.split(".")
    node: Any = document["implied"] if parts[0] == "implied" else document["recipe"]
    for part in parts[1:] if parts[0] == "implied" else parts:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def mismatches(document: dict, rows: list[dict[str, str]]) -> list[str]:
    """Every row the dry run or the official value contradicts."""
    problems = []
    for row in rows:
        ours, official = value(row["ours"]), value(row["official"])
        try:
            actual = resolved(document, row["key"])
        except (KeyError, IndexError, TypeError):
            problems.append(f"{row['key']}: not in the dry run's output")
            continue
        if not same(actual, ours):
            problems.append(f"{row['key']}: the recipe resolves to {actual!r}, the table says {ours!r}")
        deliberate = row["note"].startswith("deliberate")
        if same(ours, official) == deliberate:
            problems.append(f"{row['key']}: ours {ours!r}, official {official!r}, note {row['note']!r}")
    return problems


def dry_run(capsys, recipe: str, *arguments: str) -> dict:
    finetune_main([str(ROOT / "recipes" / f"{recipe}.yaml"), "--dry-run", "--world-size", "8", *arguments])
    return yaml.safe_load(capsys.readouterr().out)


def test_every_paper_recipe_has_its_table() -> None:
    tables = doc_tables()
    assert sorted(tables) == sorted(PAPER_RECIPES)
    for name, rows in tables.items():
        keys = [row["key"] for row in rows]
        assert len(keys) == len(set(keys)), name
        assert all(row["source"] for row in rows), name
        assert {"implied.peak_lr", "implied.min_lr", "implied.global_batch", "implied.steps_per_epoch",
                "optimizer.schedule_step", "train.amp"} <= set(keys), name


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_recipe_resolves_to_the_official_values(capsys, recipe) -> None:
    document = dry_run(capsys, recipe)
    assert mismatches(document, doc_tables()[recipe]) == []


@pytest.mark.parametrize("key, wrong", [
    ("optimizer.lr", 4.0e-5),                         # a recipe lr off by 2x
    ("optimizer.schedule_step", "update"),            # per-update stepping
])
def test_a_planted_wrong_value_is_caught(capsys, key, wrong) -> None:
    document = dry_run(capsys, "deit_s", "--set", f"{key}={json.dumps(wrong)}")
    assert mismatches(document, doc_tables()["deit_s"]) != []


def test_drop_path_in_train_mode_is_caught(capsys) -> None:
    """The official fine-tuning runs in eval mode: a drop-path that train mode switches on
    is a difference the table catches."""
    document = dry_run(capsys, "deit_s", "--set", "model.kwargs.drop_path_rate=0.1")
    assert document["implied"]["active_in_train_mode"] == "DropPath x22"
    assert mismatches(document, doc_tables()["deit_s"]) == [
        "implied.active_in_train_mode: the recipe resolves to 'DropPath x22', the table says 'none'"]


def test_dry_run_without_data_or_weights_says_so(capsys, tmp_path) -> None:
    document = dry_run(capsys, "deit_s", "--set", f"data.root={tmp_path / 'imagenet'}")
    notes = " ".join(document["notes"])
    assert f"{tmp_path / 'imagenet' / 'train'}" in notes and "1,281,167" in notes
    assert "random weights" in notes
    assert document["implied"]["train_images"] == 1_281_167


@pytest.mark.parametrize("arguments, message", [
    (["--dry-run", "--set", "optimizer.schedule_step=epochs"], "optimizer.schedule_step: 'epochs' is not one of"),
    (["--dry-run", "--set", "data.crop_pct=1.5"], "data.crop_pct: must be a fraction in (0, 1]"),
    (["--world-size", "8"], "--world-size is read by --dry-run only"),
    (["--dry-run", "--world-size", "0"], "--world-size must be at least 1"),
])
def test_bad_dry_runs_exit_2_in_one_line(capsys, arguments, message) -> None:
    with pytest.raises(SystemExit) as stopped:
        finetune_main([str(ROOT / "recipes" / "deit_s.yaml"), *arguments])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1, error


def official_epoch_lr(epoch: int, peak: float, floor: float, epochs: int) -> float:
    """DeiT's loop: ``lr_scheduler.step(epoch)`` after each epoch, so epoch e trains at the
    cosine's value at max(e - 1, 0), written out."""
    t = max(epoch - 1, 0)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t / epochs))


def test_the_loop_steps_per_epoch_as_the_official_loop(tmp_path) -> None:
    recipe = tiny_recipe(tmp_path, {"optimizer": {"schedule_step": "epoch", "scale_min_lr": False, "lr": 0.05,
                                                  "min_lr": 1.0e-3},
                                    "train": {"epochs": 4, "max_steps_per_epoch": 2, "batch_size": 32}})
    seen: list[float] = []
    with loop.update_hook(lambda run: seen.append(run.optimizer.param_groups[0]["lr"])):
        loop.train(recipe, show_progress=False)
    peak = 0.05 * 32 / 512
    expected = [official_epoch_lr(epoch, peak, 1.0e-3, 4) for epoch in range(4) for _ in range(2)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[2] == pytest.approx(peak) and seen[4] < seen[2]  # the second epoch still at the peak


def test_default_keys_keep_the_per_update_schedule(tmp_path) -> None:
    """Recipes without the new keys get the schedule they always had: timm's cosine per
    update to the batch-scaled min lr, with warm-up at the head of the same cosine."""
    recipe = tiny_recipe(tmp_path, {"optimizer": {"warmup_epochs": 0.5}})
    runtime = Runtime(torch.device("cpu"), 0, 2)
    steps = 10

    def lrs(make) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.optimizer.lr * 64 / 512)
        scheduler = make(optimizer)
        values = []
        for update in range(recipe.train.epochs * steps):
            scheduler.step_update(update)
            values.append(optimizer.param_groups[0]["lr"])
        return values

    scale = recipe.train.batch_size * 2 / 512
    reference = lrs(lambda optimizer: timm.scheduler.CosineLRScheduler(
        optimizer, t_initial=recipe.train.epochs * steps, lr_min=recipe.optimizer.min_lr * scale, warmup_t=5,
        warmup_lr_init=recipe.optimizer.warmup_lr, t_in_epochs=False))
    assert lrs(lambda optimizer: build_scheduler(optimizer, recipe, runtime, steps)) == reference


def test_repeated_augmentation_shows_each_image_three_times_across_processes(tmp_path) -> None:
    recipe = tiny_recipe(tmp_path, {"data": {"repeated_augmentation": True}})
    shards = [list(train_sampler(range(768), recipe, rank, 4, epoch=0)) for rank in range(4)]
    seen = sorted(index for shard in shards for index in shard)
    assert all(len(shard) == 768 // 4 for shard in shards)  # DeiT: len // 256 * 256 / processes each
    counts = {index: seen.count(index) for index in set(seen)}
    assert set(counts.values()) == {3}  # every drawn image three times, on three processes
    assert all(len({rank for rank, shard in enumerate(shards) if index in shard}) == 3
               for index in list(counts)[:50])
    again = copy.deepcopy(recipe)
    again.train.seed = 1
    assert list(train_sampler(range(768), again, 0, 4, epoch=0)) != shards[0]
