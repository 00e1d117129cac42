"""Recipes fail early and clearly; overrides apply; shipped recipes are valid."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from finetune_helpers import tiny_recipe, write_recipe

from evit_patch.train.recipe import KeepRateScheduleConfig, RecipeError, load_recipe
from evit_patch.train.schedule import keep_rate_at

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(ROOT.glob("recipes/*.yaml"))


def test_typo_key_names_the_key_and_the_closest_valid_one(tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train.epoch'; did you mean 'train.epochs'\?"):
        tiny_recipe(tmp_path, {"train": {"epoch": 3}})
    with pytest.raises(RecipeError, match=r"'optimiser'.*did you mean 'optimizer'"):
        load_recipe(write_recipe(tmp_path, {"optimiser": {"lr": 1.0}}))


def test_wrong_types_and_missing_files_fail_before_any_work(tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"train.batch_size: expected int"):
        tiny_recipe(tmp_path, {"train": {"batch_size": "big"}})
    with pytest.raises(RecipeError, match=r"reduction.layers\[0\]: expected int"):
        tiny_recipe(tmp_path, {"reduction": {"layers": ["one"]}})
    with pytest.raises(RecipeError, match=r"train.amp: 'fp8' is not one of"):
        tiny_recipe(tmp_path, {"train": {"amp": "fp8"}})
    with pytest.raises(RecipeError, match=r"model.checkpoint: file 'nowhere.safetensors' does not exist"):
        tiny_recipe(tmp_path, {"model": {"checkpoint": "nowhere.safetensors"}})
    (tmp_path / "bare.yaml").write_text("train: {epochs: 1}\n")
    with pytest.raises(RecipeError, match=r"missing required key\(s\) \['model'\]"):
        load_recipe(tmp_path / "bare.yaml")


def test_overrides_apply_as_yaml_values(tmp_path) -> None:
    recipe = load_recipe(write_recipe(tmp_path), ["train.epochs=7", "reduction.layers=[0, 2]", "reduction.fuse=false",
                                                  "optimizer.lr=1e-3"])
    assert (recipe.train.epochs, recipe.reduction.layers, recipe.reduction.fuse) == (7, [0, 2], False)
    assert recipe.optimizer.lr == 1e-3
    with pytest.raises(RecipeError, match="did you mean 'train.epochs'"):
        load_recipe(write_recipe(tmp_path), ["train.epohcs=7"])


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_are_valid(path, tmp_path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "class_a").mkdir(parents=True)
    overrides = []
    if "fashion_mnist" not in path.name:  # ImageNet recipes: stand-in folders and weight files
        (tmp_path / "weights.pth").write_bytes(b"")
        overrides.append(f"data.root={tmp_path}")
        values = yaml.safe_load(path.read_text())
        overrides += [f"{section}.pretrained_file={tmp_path / 'weights.pth'}"
                      for section in ("model", "teacher") if (values.get(section) or {}).get("pretrained_file")]
    recipe = load_recipe(path, overrides)
    assert recipe.train.epochs > 0


def test_missing_data_folders_fail_before_any_work(tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"data.train_split: folder '.*nowhere/train' does not exist"):
        tiny_recipe(tmp_path, {"data": {"dataset": "imagefolder", "root": str(tmp_path / "nowhere")}})
    with pytest.raises(RecipeError, match=r"data.root: an imagefolder dataset needs"):
        tiny_recipe(tmp_path, {"data": {"dataset": "imagefolder"}})
    with pytest.raises(RecipeError, match=r"data.root: folder .* does not exist.*data.download: true"):
        tiny_recipe(tmp_path, {"data": {"root": str(tmp_path / "no-fashion-mnist")}})


def test_misspelt_choice_suggests_the_valid_one(tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"keep_rate_schedule.kind: 'cosin' is not one of.*did you mean 'cosine'"):
        tiny_recipe(tmp_path, {"keep_rate_schedule": {"kind": "cosin"}})


def test_command_line_reports_a_bad_recipe_without_a_traceback(tmp_path) -> None:
    recipe = write_recipe(tmp_path)
    completed = subprocess.run(
        [sys.executable, "-m", "evit_patch.finetune", str(recipe), "--set", "reduction.keep_rat=0.5"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert completed.returncode == 2
    assert "unknown recipe key 'reduction.keep_rat'; did you mean 'reduction.keep_rate'?" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_cosine_keep_rate_schedule_follows_the_formula() -> None:
    import math

    schedule = KeepRateScheduleConfig(kind="cosine", start_epoch=10, epochs=100)
    assert keep_rate_at(0, 0.7, **vars(schedule)) == 1.0
    assert keep_rate_at(10, 0.7, **vars(schedule)) == 1.0
    for epoch in (10.5, 35.25, 60, 99.9):
        expected = 0.7 + 0.3 * (1 + math.cos(math.pi * (epoch - 10) / 100)) / 2
        assert keep_rate_at(epoch, 0.7, **vars(schedule)) == pytest.approx(expected, abs=1e-12)
    assert keep_rate_at(60, 0.7, **vars(schedule)) == pytest.approx(0.85)
    assert keep_rate_at(110, 0.7, **vars(schedule)) == keep_rate_at(300, 0.7, **vars(schedule)) == 0.7
    assert keep_rate_at(0, 0.7, **vars(KeepRateScheduleConfig())) == 0.7


def test_keys_of_earlier_versions_are_refused_naming_the_new_key(tmp_path) -> None:
    old = yaml.safe_load(write_recipe(tmp_path).read_text())
    old["evit"] = old.pop("reduction")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(RecipeError, match=r"^recipe key 'evit' is now 'reduction': rename it in the recipe \(or the --set\)$"):
        load_recipe(tmp_path / "old.yaml")
    for override, new in (("evit.keep_rate=0.5", "'evit' is now 'reduction'"),
                          ("reduction.reducer=tome", "'reduction.reducer' is now 'reduction.method'"),
                          ("dynamicvit.keep_ratio=0.5", "'dynamicvit.keep_ratio' is now 'dynamicvit.keep_rate'")):
        with pytest.raises(RecipeError, match=f"^recipe key {new}"):
            load_recipe(write_recipe(tmp_path), [override])


def test_a_recipe_stored_by_an_earlier_version_reads_with_the_new_names(tmp_path) -> None:
    from evit_patch.train.recipe import recipe_from_dict, recipe_to_dict

    now = recipe_to_dict(tiny_recipe(tmp_path))
    stored = yaml.safe_load(yaml.safe_dump(now))
    stored["evit"] = stored.pop("reduction")
    stored["evit"]["reducer"] = stored["evit"].pop("method")
    stored["dynamicvit"]["keep_ratio"] = stored["dynamicvit"].pop("keep_rate")
    assert recipe_to_dict(recipe_from_dict(stored)) == now
    assert "evit" in stored and "reducer" in stored["evit"]  # the stored mapping is left as it was
    with pytest.warns(DeprecationWarning, match="Recipe.reduction"):
        assert recipe_from_dict(stored).evit.layers == now["reduction"]["layers"]
