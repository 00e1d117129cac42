"""A run's output folder: which files are the run's, when a new run may write there, and
how it is prepared.

A run claims its folder before it builds anything, so that two runs never write into one
folder: a second run into a claimed folder stops. A folder holding a run is never written
over silently: a fresh run refuses it (and says how to resume it or where to write
instead) unless asked to overwrite, which deletes the run's own files only. A resume
continues the folder of its own checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Optional

from evit_patch.train import distributed
from evit_patch.train.checkpoint import remove_stale_temporaries
from evit_patch.train.recipe import RecipeError

RUN_FILES = ("recipe.yaml", "metrics.jsonl", "checkpoint.pth", "model.safetensors", "model_ema.safetensors")
"""What a run writes in its folder; nothing else there is ever touched."""

ATOMIC_FILES = ("checkpoint.pth", "model.safetensors", "model_ema.safetensors")
"""Files written through a temporary file, which a killed process may leave behind."""


LOCK_FILE = ".evit-run.lock"
"""Locked (``flock``) by the run writing the folder and removed when it ends; the kernel
drops the lock of a process that dies, so a killed run's leftover file blocks nothing."""


@contextmanager
def claimed_output_folder(folder: Path, runtime: distributed.Runtime) -> Iterator[None]:
    """Rank 0 claims ``folder`` (:func:`claim_output_folder`) for every process; each rank
    stops with rank 0's refusal, so none is left waiting for the others."""
    with ExitStack() as stack:
        refusal = None
        if runtime.is_main:
            try:
                stack.enter_context(claim_output_folder(folder))
            except RecipeError as error:
                refusal = str(error)
        refusal = distributed.gather(refusal, runtime)[0]
        if refusal is not None:
            raise RecipeError(refusal)
        yield


@contextmanager
def claim_output_folder(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for this run: create it, then lock its :data:`LOCK_FILE`, which no
    other run can lock while this one lives. A folder that cannot be written is refused
    here, before anything is built. On leaving, the lock file goes, and so do the folders
    the claim created if nothing was written in them."""
    created = [path for path in (folder, *folder.parents) if not os.path.lexists(path)]
    try:
        handle = _lock(folder)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        (folder / LOCK_FILE).unlink(missing_ok=True)  # before the lock goes: a new claim locks a new file
        os.close(handle)
        _remove_empty(created)


def _lock(folder: Path) -> int:
    """The descriptor of ``folder``'s lock file, locked by this process."""
    dangling = next((path for path in (folder, *folder.parents) if path.is_symlink() and not path.exists()), None)
    if dangling is not None:
        raise RecipeError(f"train.output_dir {str(folder)!r} cannot be created: {str(dangling)!r} is a symbolic link "
                          f"to {os.readlink(dangling)!r}, which does not exist; create that folder or set "
                          "train.output_dir to another")
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise RecipeError(f"train.output_dir {str(folder)!r} cannot be written: {error.strerror or error}; set "
                              "train.output_dir to a folder you can write") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 200).decode(errors="replace").strip() or "another process"
            os.close(handle)
            raise RecipeError(f"train.output_dir {str(folder)!r} is in use by a run that has not ended ({holder}): "
                              "wait for it to end, or write elsewhere with --set train.output_dir=NEW_FOLDER") from None
        if _is_current(handle, folder / LOCK_FILE):
            os.ftruncate(handle, 0)
            os.write(handle, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
            return handle
        os.close(handle)  # locked a file that the run before removed as it ended: lock the folder's new one


def _is_current(handle: int, path: Path) -> bool:
    """Whether ``handle`` is still the file at ``path`` (not one removed since it was opened)."""
    try:
        return os.stat(path).st_ino == os.fstat(handle).st_ino
    except FileNotFoundError:
        return False


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first) while they are empty."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:
            return


def run_files(folder: Path) -> list[str]:
    """The run files present in ``folder``."""
    return [name for name in RUN_FILES if (folder / name).exists()]


def _same_file(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def check_output_folder(folder: Path, resume: Optional[Path], overwrite: bool) -> None:
    """Refuse to write a run where another run's files are, unless ``overwrite``; a resume
    may continue the folder its checkpoint is in."""
    present = run_files(folder)
    own_checkpoint = resume is not None and _same_file(resume, folder / "checkpoint.pth")
    if own_checkpoint and overwrite:
        raise RecipeError(f"--overwrite would delete the run in {str(folder)!r} that --resume continues; drop "
                          "--overwrite to continue it, or drop --resume to start it over")
    if not present or overwrite or own_checkpoint:
        return
    files = ", ".join(present)
    elsewhere = "write elsewhere with --set train.output_dir=NEW_FOLDER"
    replace = "or start it over with --overwrite (deletes those files only)"
    if resume is not None:
        raise RecipeError(f"train.output_dir {str(folder)!r} holds another run ({files}) than the one --resume "
                          f"continues ({str(resume)!r}): {elsewhere}, {replace}")
    if "checkpoint.pth" in present:
        raise RecipeError(f"train.output_dir {str(folder)!r} already holds a run ({files}): continue it with "
                          f"--resume {str(folder / 'checkpoint.pth')}, {elsewhere}, {replace}")
    raise RecipeError(f"train.output_dir {str(folder)!r} already holds a run ({files}) that saved no checkpoint: "
                      f"{elsewhere}, {replace}")


def prepare_output_folder(folder: Path, overwrite: bool, finished_epochs: Optional[int]) -> None:
    """In the claimed folder: clear temporary files of writes that were killed; with
    ``overwrite``, delete the previous run's files; on a resume (``finished_epochs``),
    drop the metrics lines of epochs the checkpoint had not finished, so that the file
    describes one run."""
    remove_stale_temporaries(folder, ATOMIC_FILES)
    if overwrite:
        for name in RUN_FILES:
            (folder / name).unlink(missing_ok=True)
    elif finished_epochs is not None:
        _trim_metrics(folder / "metrics.jsonl", finished_epochs)


def _trim_metrics(path: Path, finished_epochs: int) -> None:
    """Keep the lines of epochs up to ``finished_epochs`` (a line cut short by a kill is dropped too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            epoch = json.loads(line).get("epoch")
        except (ValueError, AttributeError):
            continue
        if isinstance(epoch, int) and epoch <= finished_epochs:
            kept.append(line + "\n")
    path.write_text("".join(kept))
