"""File faults are one line naming the path and the cause, with an exit status and no
traceback, and lose nothing already saved: an output folder that cannot be written or is
a dangling link (found before anything is built), an unreadable --resume or
model.checkpoint, a disk that fills during a save, evit-visualize's bad inputs; and the
weights files get the permissions the umask gives the run's other files."""

from __future__ import annotations

import builtins
import errno
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from finetune_helpers import write_recipe
from PIL import Image
from safetensors.torch import save_file

import evit_patch.train.checkpoint as checkpoint
import evit_patch.train.loop as loop
from evit_patch.tools.finetune import main as finetune_main
from evit_patch.tools.visualize import main as visualize_main
from evit_patch.train.checkpoint import load_checkpoint
from evit_patch.train.run_folder import LOCK_FILE

SHORT = {"train": {"epochs": 1, "max_steps_per_epoch": 2}, "data": {"train_subset": 64, "eval_subset": 32}}


def run_cli(main, argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and the one error line (the last of stderr, after any progress bars)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert err.endswith("\n") and "Traceback" not in err, err
    line = err[:-1].split("\n")[-1].split("\r")[-1]
    assert line.startswith("error: "), err
    return stopped.value.code, line


def refuse_access(monkeypatch, folder: Path) -> None:
    """Opening or creating anything under ``folder`` fails as it would for a user who may
    not write there (the tests run as root, whom permissions do not stop)."""
    def denied(path) -> bool:
        return Path(os.fsdecode(path)).absolute().is_relative_to(folder)

    real_mkdir, real_open, real_builtin_open = Path.mkdir, os.open, builtins.open

    def mkdir(self, *args, **kwargs):
        if denied(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    def os_open(path, *args, **kwargs):
        if denied(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_open(path, *args, **kwargs)

    def builtin_open(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and denied(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_builtin_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", builtin_open)


# ---- the output folder, before anything is built ----


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "to-create"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_anything_is_built(tmp_path, capsys, no_work,
                                                                                    monkeypatch, exists) -> None:
    folder = tmp_path / "locked" / "run"
    if exists:
        folder.mkdir(parents=True)
    recipe = write_recipe(tmp_path, {**SHORT, "train": {**SHORT["train"], "output_dir": str(folder)}})
    refuse_access(monkeypatch, tmp_path / "locked")
    code, line = run_cli(finetune_main, [str(recipe), "--no-report"], capsys)
    assert code == 2
    assert f"train.output_dir {str(folder)!r} cannot be written: Permission denied; set train.output_dir to a " \
           "folder you can write" in line, line


@pytest.mark.parametrize("under", [False, True], ids=["the-folder", "a-parent"])
def test_a_dangling_symlink_as_the_output_folder_is_one_line(tmp_path, capsys, no_work, under) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    folder = link / "run" if under else link
    recipe = write_recipe(tmp_path, {**SHORT, "train": {**SHORT["train"], "output_dir": str(folder)}})
    code, line = run_cli(finetune_main, [str(recipe), "--no-report"], capsys)
    assert code == 2
    assert f"train.output_dir {str(folder)!r} cannot be created: {str(link)!r} is a symbolic link to " \
           f"{str(tmp_path / 'gone')!r}, which does not exist" in line, line
    assert link.is_symlink() and not (tmp_path / "gone").exists()


# ---- files read ----


def test_an_unreadable_resume_file_is_one_line(tmp_path, capsys, no_work, monkeypatch) -> None:
    (tmp_path / "private").mkdir()
    unreadable = tmp_path / "private" / "checkpoint.pth"
    torch.save({"model": {}}, unreadable)
    recipe = write_recipe(tmp_path, SHORT)
    cases = [(tmp_path / "private", "is a folder; pass the checkpoint.pth file in it"),
             (unreadable, "cannot be read: Permission denied")]
    refuse_access(monkeypatch, unreadable)
    for path, says in cases:
        code, line = run_cli(finetune_main, [str(recipe), "--no-report", "--resume", str(path)], capsys)
        assert code == 1
        assert f"checkpoint {str(path)!r} {says}" in line, line
    assert not (tmp_path / "run").exists()


def test_a_folder_or_an_unreadable_file_as_model_checkpoint_is_named_as_such(tmp_path, capsys, no_work,
                                                                            monkeypatch) -> None:
    (tmp_path / "fx").mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"weights")
    recipe = write_recipe(tmp_path, SHORT)
    refuse_access(monkeypatch, tmp_path / "secret.safetensors")
    cases = [(tmp_path / "fx", f"model.checkpoint: {str(tmp_path / 'fx')!r} is a folder, not a weights file; pass "
                               "the .safetensors or .pth file in it"),
             (tmp_path / "secret.safetensors", f"model.checkpoint: file {str(tmp_path / 'secret.safetensors')!r} "
                                               "cannot be read: Permission denied")]
    for path, says in cases:
        code, line = run_cli(finetune_main, [str(recipe), "--no-report", "--set", f"model.checkpoint={path}"], capsys)
        assert code == 2
        assert says in line, line


# ---- files written ----


def full_disk_in_torch_save(monkeypatch) -> None:
    """The second torch.save (epoch 2's checkpoint) fails as torch's zip writer does on a full disk, part-written."""
    real_save, calls = torch.save, []

    def save(state, path, *args, **kwargs):
        calls.append(path)
        if len(calls) < 2:
            return real_save(state, path, *args, **kwargs)
        Path(path).write_bytes(b"PK\x03\x04 part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4096")

    monkeypatch.setattr(torch, "save", save)


def full_disk_in_safetensors(monkeypatch) -> None:
    def save_file(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", save_file)


def full_disk_in_metrics(monkeypatch) -> None:
    """Appending epoch 2's metrics line fails."""
    lines = []

    def open_metrics(path, mode="r", *args, **kwargs):
        lines.append(path)
        if len(lines) < 2:
            return builtins.open(path, mode, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(loop, "open", open_metrics, raising=False)


FULL_DISKS = {
    "checkpoint": (full_disk_in_torch_save, "checkpoint.pth", "unexpected pos 4160 vs 4096 (the disk may be full: "),
    "weights": (full_disk_in_safetensors, "model.safetensors", "No space left on device", "nothing was written; the "
                "trained weights are safe in"),
    "metrics": (full_disk_in_metrics, "metrics.jsonl", "No space left on device"),
}


@pytest.mark.parametrize("where", FULL_DISKS)
def test_a_disk_that_fills_during_a_save_is_one_line_and_keeps_what_was_saved(tmp_path, capsys, monkeypatch,
                                                                              where) -> None:
    fill, name, *says = FULL_DISKS[where]
    recipe = write_recipe(tmp_path, {**SHORT, "train": {**SHORT["train"], "epochs": 2}})
    folder = tmp_path / "run"
    fill(monkeypatch)
    code, line = run_cli(finetune_main, [str(recipe), "--no-report"], capsys)
    assert code == 1
    assert repr(str(folder / name)) in line and all(fragment in line for fragment in says), line
    if where == "checkpoint":
        assert "MiB free on it); the previous one is intact; free space (or fix the folder) and continue " \
               f"with --resume {folder / 'checkpoint.pth'}" in line, line
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == ["checkpoint.pth", "metrics.jsonl", "recipe.yaml"]  # no temporary, no lock
    assert load_checkpoint(folder / "checkpoint.pth")["position"]["epoch"] == (2 if where == "weights" else 1)
    if where != "weights":  # nothing saved was lost: the run continues from its last checkpoint
        finetune_main([str(recipe), "--no-report", "--resume", str(folder / "checkpoint.pth")])
        assert load_checkpoint(folder / "checkpoint.pth")["position"]["epoch"] == 2


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weights_files_get_the_permissions_the_umask_gives_the_runs_other_files(tmp_path, umask) -> None:
    recipe = write_recipe(tmp_path, {**SHORT, "train": {**SHORT["train"], "ema_decay": 0.99}})
    previous = os.umask(umask)
    try:
        finetune_main([str(recipe), "--no-report"])
    finally:
        os.umask(previous)
    folder = tmp_path / "run"
    modes = {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir()}
    assert modes == dict.fromkeys(["recipe.yaml", "metrics.jsonl", "checkpoint.pth", "model.safetensors",
                                   "model_ema.safetensors"], 0o666 & ~umask)
    assert LOCK_FILE not in modes


# ---- evit-visualize ----


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_visualize_file_faults_are_one_line(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    (tmp_path / "not_an_image.png").write_bytes(b"text")
    weights = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2).state_dict()
    save_file(weights, str(tmp_path / "good.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "good.safetensors").read_bytes()[:5000])
    torch.save(weights, tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:5000])
    torch.save({"model": RunsACommand()}, tmp_path / "pickle.pth")
    (tmp_path / "plain_pickle.pth").write_bytes(pickle.dumps({"model": RunsACommand()}))
    cases = [
        ("cut.safetensors", "in.png", 1, "weights file 'cut.safetensors' is not a readable safetensors file"),
        ("cut.pth", "in.png", 1, "checkpoint 'cut.pth' is corrupt or truncated"),
        ("pickle.pth", "in.png", 1, "checkpoint 'pickle.pth' holds Python objects (posix.system) besides tensors"),
        ("plain_pickle.pth", "in.png", 1, "checkpoint 'plain_pickle.pth' is corrupt or truncated"),
        ("good.safetensors", "missing.png", 2, "--image 'missing.png' does not exist"),
        ("good.safetensors", ".", 2, "--image '.' is a folder; pass a PNG or JPEG file"),
        ("good.safetensors", "not_an_image.png", 1, "cannot identify image file 'not_an_image.png'"),
    ]
    for weights_file, image, status, says in cases:
        code, line = run_cli(visualize_main, ["--model", "deit_tiny_patch16_224", "--model-arg", "img_size=64",
                                              "--model-arg", "depth=2", "--layers", "1", "--checkpoint", weights_file,
                                              "--image", image, "--out", "out.png"], capsys)
        assert (code, says in line) == (status, True), (weights_file, image, line)
    code, line = run_cli(visualize_main, ["--run", "absent", "--fashion-mnist", "0"], capsys)
    assert code == 2 and "'absent' is not a folder; pass the output folder of a fine-tuning run" in line, line
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.png").exists()
