"""Checkpoints written atomically and read weights-only; final models as safetensors."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from evit_patch.errors import CheckpointError


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``:
    a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({type(error).__name__}: {error}); "
            "resume from an earlier checkpoint or start again"
        ) from error


def load_weights(model: nn.Module, path: str | Path) -> None:
    """A state_dict from ``.safetensors`` or a weights-only ``.pth``/``.pt`` (a training
    checkpoint's ``model`` entry is taken when present)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = load_checkpoint(path)
        state = state.get("model", state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {str(path)!r} do not fit the model: missing keys {missing[:8]}, unexpected keys "
            f"{unexpected[:8]} (check the model name and its kwargs in the recipe)"
        )


def save_weights(model: nn.Module, path: str | Path) -> None:
    """The model's state_dict as safetensors (shared tensors stored once)."""
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
