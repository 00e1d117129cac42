"""Run folders and resumes keep their promises: no silent overwrite, a resumed recipe's
allowed changes take effect (the lr schedule follows the new length) and its other
changes are refused, resumed epochs log all their steps, a diverging run names only a
checkpoint of its own, and a save killed midway leaves nothing behind for long."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml
from finetune_helpers import write_recipe
from test_finetune import InterruptAfter

import evit_patch.train.loop as loop
from evit_patch.tools.finetune import main as finetune_main
from evit_patch.train.checkpoint import load_checkpoint, remove_stale_temporaries
from evit_patch.train.criterion import DistillationLoss
from evit_patch.train.recipe import load_recipe, recipe_to_dict
from evit_patch.train.resume import recipe_changes

ROOT = Path(__file__).resolve().parent.parent
SHORT = {"train": {"epochs": 1, "max_steps_per_epoch": 2}, "optimizer": {"weight_decay": 0.01}}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        finetune_main([*argv, "--no-report"])
    return stopped.value.code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The error, which must be the one last line of stderr (after warnings and progress bars)."""
    assert err.endswith("\n") and "Traceback" not in err, err
    line = err[:-1].split("\n")[-1].split("\r")[-1]
    assert line.startswith("error: "), err
    return line


def sets(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> Path:
    """A finished one-epoch run of two steps, to copy."""
    folder = tmp_path_factory.mktemp("one_epoch")
    return loop.train(load_recipe(write_recipe(folder, SHORT)), show_progress=False)


def copied(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a run and a recipe file that writes into it: (recipe, run folder)."""
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    return write_recipe(tmp_path, {**SHORT, "train": {**SHORT["train"], "output_dir": str(folder)}}), folder


# ---- the output folder ----


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(one_epoch_run, tmp_path, capsys, no_work) -> None:
    recipe, folder = copied(one_epoch_run, tmp_path)
    before = snapshot(tmp_path)
    code, err = run_cli([str(recipe)], capsys)
    assert code == 2
    line = error_line(err)
    assert f"train.output_dir {str(folder)!r} already holds a run (recipe.yaml, metrics.jsonl, checkpoint.pth, " \
           "model.safetensors)" in line
    assert f"continue it with --resume {folder / 'checkpoint.pth'}" in line
    assert "--set train.output_dir=NEW_FOLDER" in line and "--overwrite" in line
    assert snapshot(tmp_path) == before


def test_a_run_that_saved_no_checkpoint_is_not_offered_for_resuming(tmp_path, capsys, no_work) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("model: {name: x}\n")
    code, err = run_cli([str(write_recipe(tmp_path, SHORT))], capsys)
    assert code == 2
    line = error_line(err)
    assert "already holds a run (recipe.yaml) that saved no checkpoint" in line and "--resume" not in line


def test_overwrite_replaces_the_runs_own_files_only_once_the_new_run_has_started(one_epoch_run, tmp_path, capsys,
                                                                                monkeypatch) -> None:
    recipe, folder = copied(one_epoch_run, tmp_path)
    (folder / "notes.txt").write_text("mine")
    (folder / "plots").mkdir()
    (folder / "plots" / "loss.png").write_bytes(b"png")
    old_checkpoint = load_checkpoint(folder / "checkpoint.pth")
    before = snapshot(folder)

    def missing_data(*args, **kwargs):
        raise FileNotFoundError("Fashion-MNIST train files not found")

    monkeypatch.setattr(loop, "build_dataset", missing_data)
    code, err = run_cli([str(recipe), "--overwrite"], capsys)
    assert code == 1 and "Fashion-MNIST" in error_line(err)
    assert snapshot(folder) == before  # the new run never started: the old one is intact
    monkeypatch.undo()

    finetune_main([str(recipe), "--overwrite", "--no-report", *sets("train.seed=11")])
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "plots" / "loss.png").read_bytes() == b"png"
    assert [line["epoch"] for line in metrics(folder)] == [1]  # not appended to the old run's
    new_checkpoint = load_checkpoint(folder / "checkpoint.pth")
    assert new_checkpoint["recipe"]["train"]["seed"] == 11 and yaml.safe_load(
        (folder / "recipe.yaml").read_text())["train"]["seed"] == 11
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(new_checkpoint["model"][key], old_checkpoint["model"][key])


def test_resuming_into_another_runs_folder_or_overwriting_the_resumed_run_is_refused(one_epoch_run, tmp_path,
                                                                                    capsys, no_work) -> None:
    recipe, folder = copied(one_epoch_run, tmp_path)
    shutil.copytree(one_epoch_run, tmp_path / "other")
    before = snapshot(tmp_path)
    code, err = run_cli([str(recipe), "--resume", str(tmp_path / "other" / "checkpoint.pth"),
                         *sets("train.epochs=2")], capsys)
    assert code == 2
    assert f"train.output_dir {str(folder)!r} holds another run" in error_line(err)
    code, err = run_cli([str(recipe), "--resume", str(folder / "checkpoint.pth"), "--overwrite",
                         *sets("train.epochs=2")], capsys)
    assert code == 2
    assert "--overwrite would delete the run" in error_line(err)
    assert snapshot(tmp_path) == before


def test_stale_temporary_files_are_recognised_by_name(tmp_path) -> None:
    names = [".checkpoint.pth.ab_12XyZ", ".model.safetensors.k3j4h5g6", ".checkpoint.pth.notes",
             "checkpoint.pth.abcdefgh", ".other.pth.abcdefgh", ".checkpoint.pth"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path, ("checkpoint.pth", "model.safetensors"))
    assert sorted(path.name for path in removed) == [".checkpoint.pth.ab_12XyZ", ".model.safetensors.k3j4h5g6"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names[2:])


KILL_DURING_SECOND_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch
    import evit_patch.train.checkpoint as checkpoint
    from evit_patch.train.loop import train
    from evit_patch.train.recipe import load_recipe, recipe_to_dict

    saves, real_save = [], torch.save
    def save(state, target):
        saves.append(target)
        if len(saves) == 2:  # the second epoch's checkpoint: half written, then killed
            with open(target, "wb") as stream:
                stream.write(b"PK" + bytes(4096))
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(state, target)
    checkpoint.torch.save = save
    train(load_recipe(sys.argv[1]), show_progress=False)
""")


def test_a_save_killed_midway_leaves_a_temporary_that_the_next_start_clears(tmp_path, capsys) -> None:
    recipe = write_recipe(tmp_path, {"train": {"epochs": 2, "max_steps_per_epoch": 1},
                                     "data": {"train_subset": 32, "eval_subset": 16}})
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SAVE, str(recipe)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = tmp_path / "run"
    stale = [path.name for path in folder.iterdir() if path.name.startswith(".checkpoint.pth.")]
    assert len(stale) == 1 and (folder / stale[0]).stat().st_size > 4096
    assert load_checkpoint(folder / "checkpoint.pth")["position"]["epoch"] == 1  # the atomic write held
    assert [line["epoch"] for line in metrics(folder)] == [1, 2]  # epoch 2's line came before its checkpoint

    finetune_main([str(recipe), "--resume", str(folder / "checkpoint.pth"), "--no-report"])
    assert not [path for path in folder.iterdir() if path.name.startswith(".checkpoint.pth.")]
    assert [line["epoch"] for line in metrics(folder)] == [1, 2]  # epoch 2 logged once, by the run that finished it
    assert load_checkpoint(folder / "checkpoint.pth")["position"]["epoch"] == 2


# ---- what a resume may change ----


def cosine_lr(update: int, total: int, lr: float, min_lr: float, batch: int = 32) -> float:
    """The recipe's cosine schedule written out: rates per 512 images, no warm-up."""
    high, low = lr * batch / 512, min_lr * batch / 512
    return low + 0.5 * (high - low) * (1 + math.cos(math.pi * update / total))


@contextlib.contextmanager
def record_updates() -> Iterator[list[list[tuple[float, float]]]]:
    """(lr, weight decay) of every parameter group at every update of the runs inside the block."""
    seen: list[list[tuple[float, float]]] = []
    with loop.update_hook(lambda run: seen.append([(group["lr"], group["weight_decay"])
                                                   for group in run.optimizer.param_groups])):
        yield seen


def test_more_epochs_on_resume_give_the_schedule_of_a_fresh_run_of_that_length(one_epoch_run, tmp_path,
                                                                              capsys) -> None:
    recipe, folder = copied(one_epoch_run, tmp_path)
    with record_updates() as seen:
        finetune_main([str(recipe), "--resume", str(folder / "checkpoint.pth"), "--no-report", *sets("train.epochs=3")])
    err = capsys.readouterr().err
    assert "warning: resuming with train.epochs changed from 1 to 3: the lr schedule follows the new recipe: from " \
           "update 2 on the lr is what a fresh run of it has there" in err
    assert len(seen) == 4  # updates 2..5 of 3 epochs x 2 steps
    for update, groups in enumerate(seen, start=2):
        assert groups[0][0] == pytest.approx(cosine_lr(update, 6, 8e-2, 1e-4), rel=1e-12), update
    assert [line["epoch"] for line in metrics(folder)] == [1, 2, 3]
    assert yaml.safe_load((folder / "recipe.yaml").read_text())["train"]["epochs"] == 3


def test_optimizer_settings_changed_on_resume_take_effect(one_epoch_run, tmp_path, capsys) -> None:
    recipe, folder = copied(one_epoch_run, tmp_path)
    with record_updates() as seen:
        finetune_main([str(recipe), "--resume", str(folder / "checkpoint.pth"), "--no-report",
                       *sets("train.epochs=2", "optimizer.lr=0.02", "optimizer.weight_decay=0.05")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert [line.split(" changed")[0] for line in warnings] == [
        "warning: resuming with optimizer.lr", "warning: resuming with optimizer.weight_decay",
        "warning: resuming with train.epochs", "warning: resuming with train.output_dir"]  # a copied run
    assert len(seen) == 2  # updates 2 and 3 of 2 epochs x 2 steps
    for update, groups in enumerate(seen, start=2):
        assert groups[0][0] == pytest.approx(cosine_lr(update, 4, 2e-2, 1e-4), rel=1e-12)
        assert sorted(decay for _, decay in groups) == [0.0, 0.05]  # timm's no-decay group for norms and biases


def test_turning_weight_decay_off_on_resume_is_refused(one_epoch_run, tmp_path, capsys, no_work) -> None:
    recipe, folder = copied(one_epoch_run, tmp_path)
    code, err = run_cli([str(recipe), "--resume", str(folder / "checkpoint.pth"),
                         *sets("train.epochs=2", "optimizer.weight_decay=0")], capsys)
    assert code == 2
    assert "optimizer.weight_decay: 0.01 in the checkpoint" in error_line(err) and "turning weight decay on or off" in err


REFUSED = [
    ("reduction.keep_rate=0.7", "reduction.keep_rate (0.5 there, 0.7 here)"),
    ("reduction.layers=[2]", "reduction.layers ([1] there, [2] here)"),
    ("reduction.method=tome", "reduction.method ('evit' there, 'tome' here)"),
    ("model.name=deit_tiny_patch16_224", "model.name ('vit_tiny_patch16_224' there, 'deit_tiny_patch16_224' here)"),
    ("model.kwargs.depth=4", "model.kwargs.depth (3 there, 4 here)"),
    ("data.train_subset=128", "data.train_subset (256 there, 128 here)"),
    ("train.batch_size=16", "train.batch_size (32 there, 16 here)"),
    ("train.max_steps_per_epoch=1", "train.max_steps_per_epoch (2 there, 1 here)"),
    ("train.seed=4", "train.seed (3 there, 4 here)"),
    ("train.ema_decay=0.9", "train.ema_decay (None there, 0.9 here)"),
    ("optimizer.name=sgd", "optimizer.name ('adamw' there, 'sgd' here)"),
    ("keep_rate_schedule.kind=cosine", "keep_rate_schedule.kind ('constant' there, 'cosine' here)"),
    ("teacher.name=vit_tiny_patch16_224", "teacher (None there, {'name': 'vit_tiny_patch16_224',"),
]


@pytest.mark.parametrize("override,named", REFUSED, ids=[case[0] for case in REFUSED])
def test_a_resume_that_changes_what_the_run_is_is_refused(one_epoch_run, tmp_path, capsys, no_work, override,
                                                          named) -> None:
    recipe, folder = copied(one_epoch_run, tmp_path)
    before = snapshot(tmp_path)
    code, err = run_cli([str(recipe), "--resume", str(folder / "checkpoint.pth"), *sets("train.epochs=2", override)],
                        capsys)
    assert code == 2
    line = error_line(err)
    assert f"--resume {str(folder / 'checkpoint.pth')!r} is a training checkpoint of vit_tiny_patch16_224, and " \
           "this recipe changes " in line and named in line and "train.epochs" not in line
    assert snapshot(tmp_path) == before


def test_every_refused_change_is_named(one_epoch_run, tmp_path, capsys, no_work) -> None:
    recipe, folder = copied(one_epoch_run, tmp_path)
    code, err = run_cli([str(recipe), "--resume", str(folder / "checkpoint.pth"),
                         *sets("train.epochs=2", "train.seed=4", "reduction.keep_rate=0.7", "data.mixup=0.2")], capsys)
    assert code == 2
    line = error_line(err)
    assert "data.mixup (0.0 there, 0.2 here), reduction.keep_rate (0.5 there, 0.7 here), train.seed (3 there, 4 here)" in line


def test_resuming_a_finished_run_without_more_epochs_is_refused(one_epoch_run, tmp_path, capsys, no_work) -> None:
    recipe, folder = copied(one_epoch_run, tmp_path)
    code, err = run_cli([str(recipe), "--resume", str(folder / "checkpoint.pth")], capsys)
    assert code == 2
    assert "train.epochs: the checkpoint" in error_line(err) and "has finished 1 epoch(s), and train.epochs is 1: " \
           "nothing is left to train; to train longer, --set train.epochs=N with N > 1" in err


def test_a_position_past_the_end_of_this_recipes_epochs_is_one_line(one_epoch_run, tmp_path, capsys) -> None:
    """A checkpoint further into an epoch than the data now gives steps (the data root moved
    to a smaller copy, say) cannot continue the same epoch."""
    recipe, folder = copied(one_epoch_run, tmp_path)
    state = load_checkpoint(folder / "checkpoint.pth")
    state["position"] = {"epoch": 0, "step_in_epoch": 5, "global_step": 5}
    torch.save(state, folder / "checkpoint.pth")
    before = snapshot(folder)
    code, err = run_cli([str(recipe), "--resume", str(folder / "checkpoint.pth")], capsys)
    assert code == 1
    assert "stopped after step 5 of epoch 1, but this recipe's epochs have 2 steps" in error_line(err)
    assert snapshot(folder) == before


def test_recipe_changes_count_kwargs_and_emptied_sections(tmp_path) -> None:
    recipe = load_recipe(write_recipe(tmp_path))
    saved = yaml.safe_load(yaml.safe_dump(recipe_to_dict(recipe)))
    assert recipe_changes(saved, recipe) == {}
    fewer = yaml.safe_load(yaml.safe_dump(saved))
    del fewer["model"]["kwargs"]["depth"]
    assert recipe_changes(fewer, recipe) == {"model.kwargs.depth": ("absent", 3)}
    with_teacher = yaml.safe_load(yaml.safe_dump(saved))
    with_teacher["teacher"] = {"name": "vit_tiny_patch16_224", "kind": "soft"}
    assert recipe_changes(with_teacher, recipe) == {"teacher": ({"name": "vit_tiny_patch16_224", "kind": "soft"}, None)}
    older = yaml.safe_load(yaml.safe_dump(saved))
    del older["reduction"]["oracle_at_eval"]  # a key this version added: its default holds
    assert recipe_changes(older, recipe) == {}


# ---- resumed epochs, divergence ----


ONE_EPOCH = {"train": {"epochs": 1, "max_steps_per_epoch": 3}}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("straight")
    return loop.train(load_recipe(write_recipe(folder, ONE_EPOCH)), show_progress=False)


def test_a_resumed_epoch_logs_all_its_steps(straight_run, tmp_path, monkeypatch) -> None:
    """Ctrl-C at the epoch's last step leaves no step to the resumed run: its metrics line
    must still be the uninterrupted run's, from the progress the checkpoint kept."""
    interrupt_after = 2  # the third and last step
    recipe = load_recipe(write_recipe(tmp_path, ONE_EPOCH))
    monkeypatch.setattr(loop, "Interrupt", InterruptAfter(interrupt_after))
    with pytest.raises(SystemExit):
        loop.train(recipe, show_progress=False)
    monkeypatch.undo()
    folder = Path(recipe.train.output_dir)
    assert load_checkpoint(folder / "checkpoint.pth")["position"]["step_in_epoch"] == interrupt_after + 1
    shutil.copytree(folder, tmp_path / "older")
    loop.train(recipe, resume=str(folder / "checkpoint.pth"), show_progress=False)
    (expected,), (resumed,) = metrics(straight_run), metrics(folder)
    for key in ("epoch", "train_loss", "lr", "keep_rate", "top1", "top5"):
        assert resumed[key] == expected[key], key
    assert resumed["train_images_per_second"] > 0

    older = tmp_path / "older"  # a checkpoint without the epoch's progress (an older version): null, never 0.0
    state = load_checkpoint(older / "checkpoint.pth")
    del state["epoch_progress"]
    torch.save(state, older / "checkpoint.pth")
    recipe.train.output_dir = str(older)
    loop.train(recipe, resume=str(older / "checkpoint.pth"), show_progress=False)
    (first,) = metrics(older)
    assert first["train_loss"] is None and first["train_images_per_second"] is None
    assert first["top1"] == expected["top1"]


def poison_loss_at(monkeypatch, call: int) -> None:
    calls = {"n": 0}
    original = DistillationLoss.forward

    def poisoned(self, images, outputs, targets):
        calls["n"] += 1
        loss = original(self, images, outputs, targets)
        return loss * float("nan") if calls["n"] == call else loss

    monkeypatch.setattr(DistillationLoss, "forward", poisoned)


def test_divergence_in_the_first_epoch_names_no_checkpoint_not_even_an_earlier_runs(one_epoch_run, tmp_path, capsys,
                                                                                     monkeypatch) -> None:
    recipe, folder = copied(one_epoch_run, tmp_path)
    poison_loss_at(monkeypatch, 2)
    code, err = run_cli([str(recipe), "--overwrite"], capsys)
    assert code == 1
    line = error_line(err)
    assert "loss is nan at epoch 1, step 2; nothing of this step was applied; no checkpoint of this run was written " \
           "yet (it diverged in its first epoch)" in line
    assert "checkpoint.pth" not in line and not (folder / "checkpoint.pth").exists()


def test_divergence_right_after_a_resume_names_the_resumed_checkpoint(one_epoch_run, tmp_path, capsys,
                                                                     monkeypatch) -> None:
    recipe = write_recipe(tmp_path, {**SHORT, "train": {"epochs": 2, "max_steps_per_epoch": 2,
                                                         "output_dir": str(tmp_path / "continued")}})
    source = one_epoch_run / "checkpoint.pth"
    poison_loss_at(monkeypatch, 1)
    code, err = run_cli([str(recipe), "--resume", str(source)], capsys)
    assert code == 1
    assert f"loss is nan at epoch 2, step 1; nothing of this step was applied; the last good checkpoint is {source}: " \
           f"--resume {source} with a lower optimizer.lr" in error_line(err)
    assert not (tmp_path / "continued" / "checkpoint.pth").exists()
