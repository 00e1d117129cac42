"""Few-step fine-tuning runs on a Fashion-MNIST subset with a tiny ViT."""

import gzip
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from finetune_helpers import tiny_recipe
from PIL import Image
from safetensors.torch import load_file

import evit_patch
import evit_patch.train.loop as loop
from evit_patch.tools.evaluate import main as evaluate_main
from evit_patch.tools.finetune import main as finetune_main
from evit_patch.train.checkpoint import CheckpointError, load_checkpoint
from evit_patch.train.criterion import DistillationLoss
from evit_patch.train.schedule import keep_rate_at

REAL_INTERRUPT = loop.Interrupt


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_loss_goes_down_and_the_run_is_saved(tmp_path) -> None:
    recipe = tiny_recipe(tmp_path, {"train": {"epochs": 3, "max_steps_per_epoch": 8}})
    run = loop.train(recipe, show_progress=False)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] - 0.1, metrics
    assert metrics[-1]["top1"] > 25.0, metrics  # 10 classes: chance is 10%
    state = load_checkpoint(run / "checkpoint.pth")
    assert state["position"] == {"epoch": 3, "step_in_epoch": 0, "global_step": 24}
    assert set(weights(run)) == set(state["model"])


def test_keep_rate_schedule_is_set_every_step(tmp_path, monkeypatch) -> None:
    recipe = tiny_recipe(tmp_path, {"keep_rate_schedule": {"kind": "cosine", "start_epoch": 0.5, "epochs": 1.0}})
    seen = []
    original = loop.set_keep_rate
    monkeypatch.setattr(loop, "set_keep_rate", lambda model, rate: (seen.append(rate), original(model, rate)))
    loop.train(recipe, show_progress=False)
    expected = [keep_rate_at(step / 4, 0.5, **vars(recipe.keep_rate_schedule)) for step in range(8)]
    assert seen == expected
    assert seen[:2] == [1.0, 1.0] and seen[-1] == 0.5 and 0.5 < seen[3] < 1.0


class InterruptAfter:
    """Stands in for Ctrl-C arriving after a given number of training steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self):
        outer = self

        class Interrupt(REAL_INTERRUPT):
            @property
            def requested(self) -> bool:
                outer.steps -= 1
                return outer.steps < 0

            @requested.setter
            def requested(self, value) -> None:
                pass

        return Interrupt()


@pytest.mark.parametrize("interrupt_after", [3, 4])  # mid-epoch, and at an epoch's last step
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, interrupt_after) -> None:
    overrides = {"data": {"mixup": 0.5, "train_subset": 256}, "train": {"ema_decay": 0.9}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = loop.train(tiny_recipe(tmp_path / "a", overrides), show_progress=False)
    recipe = tiny_recipe(tmp_path / "b", overrides)
    monkeypatch.setattr(loop, "Interrupt", InterruptAfter(interrupt_after))
    with pytest.raises(SystemExit) as stopped:
        loop.train(recipe, show_progress=False)
    assert stopped.value.code == 130
    monkeypatch.undo()
    resumed = loop.train(recipe, resume=str(Path(recipe.train.output_dir) / "checkpoint.pth"), show_progress=False)
    expected, actual = weights(straight), weights(resumed)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    ema_expected = load_file(str(straight / "model_ema.safetensors"))
    ema_actual = load_file(str(resumed / "model_ema.safetensors"))
    assert all(torch.equal(ema_expected[key], ema_actual[key]) for key in ema_expected)


def test_ctrl_c_is_turned_into_a_request() -> None:
    with loop.Interrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.requested


def test_corrupt_or_truncated_checkpoint_gives_a_clear_error(tmp_path) -> None:
    run = loop.train(tiny_recipe(tmp_path, {"train": {"epochs": 1}}), show_progress=False)
    data = (run / "checkpoint.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    for name in ("truncated.pth", "garbage.pth"):
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pth")


def test_nan_loss_stops_clearly_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    recipe = tiny_recipe(tmp_path)
    calls = {"n": 0}
    original = DistillationLoss.forward

    def poisoned(self, images, outputs, targets):
        calls["n"] += 1
        loss = original(self, images, outputs, targets)
        return loss * float("nan") if calls["n"] == 6 else loss  # step 2 of epoch 2

    monkeypatch.setattr(DistillationLoss, "forward", poisoned)
    with pytest.raises(loop.TrainingDiverged, match=r"loss is nan at epoch 2, step 2.*last good checkpoint"):
        loop.train(recipe, show_progress=False)
    state = load_checkpoint(Path(recipe.train.output_dir) / "checkpoint.pth")
    assert state["position"]["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def _top1_by_hand(model: torch.nn.Module, count: int) -> float:
    """Top-1 in percent over the first ``count`` Fashion-MNIST test images, read from the
    IDX files and normalized here."""
    folder = Path("/usr/share/datasets/fashion-mnist")
    images_file = next(folder.glob("t10k-images-idx3-ubyte*"))
    labels_file = next(folder.glob("t10k-labels-idx1-ubyte*"))
    opener = gzip.open if images_file.suffix == ".gz" else open
    with opener(images_file, "rb") as stream:
        pixels = np.frombuffer(stream.read(), dtype=np.uint8, offset=16)[: count * 784]
    with opener(labels_file, "rb") as stream:
        labels = torch.from_numpy(np.frombuffer(stream.read(), dtype=np.uint8, offset=8)[:count].astype(np.int64))
    images = (torch.from_numpy(pixels.copy()).float().view(count, 1, 28, 28) / 255 - 0.2860) / 0.3530
    with torch.no_grad():
        predictions = model.eval()(images).argmax(dim=-1)
    return 100.0 * (predictions == labels).float().mean().item()


BASE_MODEL = {"name": "vit_tiny_patch16_224", "checkpoint": "recipes/checkpoints/fashion_mnist_vit.safetensors",
              "kwargs": {"img_size": 28, "patch_size": 2, "in_chans": 1, "num_classes": 10, "embed_dim": 64,
                         "depth": 6, "num_heads": 4, "mlp_ratio": 2}}


def test_evaluate_rebuilds_the_patched_model_from_the_run(tmp_path, capsys) -> None:
    """The printed top-1 of both rows is that of the run's weights (one step away from the
    shipped base), computed here without the project's data or metric code: a model that
    evaluate built with fresh weights would score near chance."""
    overrides = {"model": BASE_MODEL, "reduction": {"layers": [1, 3, 4], "keep_rate": 0.7},
                 "optimizer": {"lr": 1e-6, "min_lr": 1e-6}, "data": {"train_subset": 32, "eval_subset": 256},
                 "train": {"epochs": 1, "max_steps_per_epoch": 1, "benchmark_batch_size": 4}}
    run = loop.train(tiny_recipe(tmp_path, overrides), show_progress=False)
    evaluate_main([str(run)])
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| model")}
    trained = timm.create_model(BASE_MODEL["name"], **BASE_MODEL["kwargs"])
    trained.load_state_dict(load_file(str(run / "model.safetensors")))
    unpatched = _top1_by_hand(trained, 256)
    assert rows["unpatched"] == pytest.approx(unpatched, abs=0.006) and unpatched > 70
    patched = evit_patch.apply_evit(trained, [1, 3, 4], 0.7)
    assert rows["EViT keep 0.7"] == pytest.approx(_top1_by_hand(patched, 256), abs=0.006)


def image_folder(root: Path, per_class: int = 24) -> Path:
    """An ImageNet-style folder of small RGB images, two classes told apart by brightness."""
    generator = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, (name, base) in enumerate((("dark", 40), ("light", 180))):
            (root / split / name).mkdir(parents=True)
            for index in range(per_class):
                pixels = np.clip(generator.normal(base, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{index}.png")
    return root


def test_mid_epoch_resume_with_random_augmentation_is_exact(tmp_path, monkeypatch) -> None:
    """RandAugment, random crops and erasing draw random numbers per image: resuming must
    not load (and so augment) the images trained on before the interruption."""
    overrides = {
        "model": {"kwargs": {"img_size": 28, "patch_size": 7, "num_classes": 2, "embed_dim": 32, "depth": 3,
                             "num_heads": 2}},
        "data": {"dataset": "imagefolder", "root": str(image_folder(tmp_path / "images")),
                 "auto_augment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.5, "train_subset": None,
                 "eval_subset": None},
        "train": {"batch_size": 8, "eval_batch_size": 16},
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = loop.train(tiny_recipe(tmp_path / "a", overrides), show_progress=False)
    recipe = tiny_recipe(tmp_path / "b", overrides)
    monkeypatch.setattr(loop, "Interrupt", InterruptAfter(2))
    with pytest.raises(SystemExit):
        loop.train(recipe, show_progress=False)
    monkeypatch.undo()
    assert load_checkpoint(Path(recipe.train.output_dir) / "checkpoint.pth")["position"]["step_in_epoch"] == 3
    resumed = loop.train(recipe, resume=str(Path(recipe.train.output_dir) / "checkpoint.pth"), show_progress=False)
    expected, actual = weights(straight), weights(resumed)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_command_line_reports_a_corrupt_resume_checkpoint(tmp_path) -> None:
    recipe = tiny_recipe(tmp_path)
    (tmp_path / "broken.pth").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(SystemExit) as stopped:
        finetune_main([str(tmp_path / "recipe.yaml"), "--resume", str(tmp_path / "broken.pth"), "--no-report"])
    assert stopped.value.code == 1
    assert not (Path(recipe.train.output_dir) / "checkpoint.pth").exists()


def test_a_run_says_what_it_does_and_where_it_writes_before_building_anything(tmp_path, monkeypatch, capsys) -> None:
    class Built(Exception):
        pass

    def stop(*args, **kwargs):
        raise Built

    monkeypatch.setattr(loop, "start_run", stop)
    recipe = tiny_recipe(tmp_path)
    with pytest.raises(Built):
        loop.train(recipe, show_progress=False)
    assert capsys.readouterr().out.splitlines() == [
        f"fine-tuning vit_tiny_patch16_224 with EViT keep 0.5 at blocks [1] from random weights: 2 epoch(s) "
        f"(at most 4 steps each) of 32 images per step and process; writing {recipe.train.output_dir}/ "
        "(checkpoint.pth and metrics.jsonl every epoch, model.safetensors at the end)"]
