"""Recipe checks that read the file system: weight files and data folders exist, the output
folder can be one. Paths are made absolute (relative ones are taken from the current folder,
else from the project the recipe lives in), so a run finds them from anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from evit_patch.train.messages import RecipeError, one_line, short
from evit_patch.train.recipe_schema import Recipe
from evit_patch.train.recipe_sections import DataConfig


def resolve_files(recipe: Recipe, base: Path, missing: Optional[list[str]] = None) -> None:
    """Make weight paths absolute and check that the files exist (or, given ``missing``,
    list the absent ones there)."""
    for section_name in ("model", "teacher", "oracle"):
        section = getattr(recipe, section_name)
        for key in ("checkpoint", "pretrained_file"):
            path = section and getattr(section, key)
            if path:
                resolved = _resolve(path, base)
                problem = _unreadable(resolved, path)
                if problem:
                    _absent(f"{section_name}.{key}: {problem}", missing)
                    continue
                setattr(section, key, str(resolved))
    _check_data_folders(recipe.data, base, missing)


def _unreadable(path: Path, shown: str) -> Optional[str]:
    """Why the weights file at ``path`` (``shown`` as the recipe gives it) cannot be read,
    in words, or None when it can."""
    if path.is_dir():
        return f"{shown!r} is a folder, not a weights file; pass the .safetensors or .pth file in it"
    try:
        with open(path, "rb"):
            return None
    except FileNotFoundError:
        return f"file {shown!r} does not exist"
    except OSError as error:
        return f"file {shown!r} cannot be read: {error.strerror or error}"


def _absent(message: str, missing: Optional[list[str]]) -> None:
    """A file or folder the recipe names is not there: refused, or listed in ``missing``."""
    if missing is None:
        raise RecipeError(message)
    missing.append(message)


def _check_data_folders(data: DataConfig, base: Path, missing: Optional[list[str]] = None) -> None:
    """The data folders a recipe names must exist (Fashion-MNIST may be downloaded if allowed)."""
    if data.dataset == "imagefolder":
        if not data.root:
            raise RecipeError("data.root: an imagefolder dataset needs the folder holding its train/ and val/ splits")
        root = _resolve(data.root, base)
        absent = [key for key in ("train_split", "eval_split") if not (root / getattr(data, key)).is_dir()]
        for key in absent:
            _absent(f"data.{key}: folder {str(root / getattr(data, key))!r} does not exist "
                    f"(data.root={data.root!r}; set data.root, or --set data.{key}=NAME)", missing)
        if not absent:
            data.root = str(root)
    elif data.root and not data.download:
        root = _resolve(data.root, base)
        if not root.is_dir():
            _absent(f"data.root: folder {data.root!r} does not exist; point it at the Fashion-MNIST IDX "
                    "files, drop it to use /usr/share/datasets/fashion-mnist, or set data.download: true", missing)
            return
        data.root = str(root)


def check_output_dir(output_dir: str) -> None:
    """The output folder, or the nearest part of its path that exists, must be a folder."""
    if not output_dir.strip():
        raise RecipeError("train.output_dir: must name a folder, got ''")
    try:
        path = Path(output_dir).expanduser()
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        is_folder = existing is None or existing.is_dir()
    except (OSError, ValueError, RuntimeError) as error:  # too long a name, a NUL byte, an unknown ~user
        raise RecipeError(f"train.output_dir: {short(output_dir)} cannot be used: {one_line(error)}") from None
    if not is_folder:
        where = "is a file" if existing == path else f"lies under {str(existing)!r}, which is a file"
        raise RecipeError(f"train.output_dir: {output_dir!r} {where}, not a folder; set train.output_dir "
                          "to a folder (new or holding a run)")


def _resolve(path: str, base: Path) -> Path:
    try:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() or candidate.exists() else base / candidate
    except (OSError, ValueError, RuntimeError) as error:  # too long a name, a NUL byte, an unknown ~user
        raise RecipeError(f"path {short(path)} cannot be used: {one_line(error)}") from None
