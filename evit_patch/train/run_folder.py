"""A run's output folder: which files are the run's, when a new run may write there, and
how it is prepared.

A folder holding a run is never written over silently: a fresh run refuses it (and says
how to resume it or where to write instead) unless asked to overwrite, which deletes
the run's own files only. A resume continues the folder of its own checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from evit_patch.train.checkpoint import remove_stale_temporaries
from evit_patch.train.recipe import RecipeError

RUN_FILES = ("recipe.yaml", "metrics.jsonl", "checkpoint.pth", "model.safetensors", "model_ema.safetensors")
"""What a run writes in its folder; nothing else there is ever touched."""

ATOMIC_FILES = ("checkpoint.pth", "model.safetensors", "model_ema.safetensors")
"""Files written through a temporary file, which a killed process may leave behind."""


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
    """Create the folder; clear temporary files of writes that were killed; with
    ``overwrite``, delete the previous run's files; on a resume (``finished_epochs``),
    drop the metrics lines of epochs the checkpoint had not finished, so that the file
    describes one run."""
    folder.mkdir(parents=True, exist_ok=True)
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
