"""Checkpoints written atomically and read weights-only; final models as safetensors.

Every failure to read or fit a file is one :class:`CheckpointError` line that says what
the file is and what was expected; a file a weights-only load refuses is never loaded
any other way.
"""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import re
import secrets
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import timm.models
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from evit_patch.errors import CheckpointError

TRAINING_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "position", "rng")
TIMM_CHECKPOINT_GLOBALS = [argparse.Namespace]
"""The one non-tensor class timm's ``train.py`` pickles into its checkpoints (its command
line, ``args``): allowed in weights-only loads; nothing else is."""
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}")  # _new_temporary; tempfile.mkstemp before it


def _write_atomic(write: Callable[[str], None], path: str | Path) -> None:
    """``write`` a temporary file in the same folder, then rename it over ``path``: a crash
    or a full disk mid-write leaves the previous file intact (and at most a temporary file,
    which :func:`remove_stale_temporaries` clears). The file gets the permissions the umask
    gives any new file; a failed write is one :class:`CheckpointError` line."""
    path = Path(path)
    temporary = _new_temporary(path)
    try:
        mode = os.stat(temporary).st_mode  # what the umask gives a new file; safetensors writes a file of its own
        write(str(temporary))
        os.chmod(temporary, mode)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError of its zip writer
        temporary.unlink(missing_ok=True)
        kept = "the previous one is intact" if path.exists() else "nothing was written"
        raise CheckpointError(f"could not write {str(path)!r}: {_write_failure(error, path.parent)}; {kept}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _new_temporary(path: Path) -> Path:
    """An empty new file ``.NAME.XXXXXXXX`` beside ``path``, created with mode 0o666 less the
    umask (``tempfile.mkstemp`` would give 0o600 whatever the umask)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}"
            try:
                os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                return temporary
            except FileExistsError:
                continue
    except OSError as error:
        raise CheckpointError(f"could not write {str(path)!r}: {_write_failure(error, path.parent)}") from None


def _write_failure(error: Exception, folder: Path) -> str:
    """Why a write failed, in words, with the free space left when the disk may be full."""
    if isinstance(error, OSError) and error.strerror:
        reason, full = error.strerror, error.errno in (errno.ENOSPC, errno.EDQUOT)
    else:  # torch's zip writer: "[enforce fail at inline_container.cc:...] . unexpected pos ..."
        reason, full = " ".join(str(error).split())[:200], not isinstance(error, OSError)
    if not full:
        return reason
    try:
        free = shutil.disk_usage(folder).free / 2**20
    except OSError:
        return reason
    return f"{reason} ({free:.0f} MiB free on its disk)" if isinstance(error, OSError) else \
        f"{reason} (the disk may be full: {free:.0f} MiB free on it)"


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` through a temporary file renamed over ``path``."""
    _write_atomic(lambda temporary: torch.save(state, temporary), path)


def remove_stale_temporaries(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files that writes of ``names`` in ``folder`` left behind when
    their process was killed mid-write; returns them. Other files are not touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [entry for entry in folder.iterdir() if entry.is_file()
             and (match := _TEMPORARY.fullmatch(entry.name)) and match.group("name") in names]
    for entry in stale:
        entry.unlink(missing_ok=True)
    return stale


def file_kind(path: str | Path) -> str:
    """What a weights file holds, in words, from its first bytes: safetensors, a zip
    (torch.save), or something else."""
    with open(path, "rb") as stream:
        head = stream.read(9)
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 0:
        return "a safetensors weights file"
    if head[:2] == b"PK":
        return "a torch.save file"
    return "not a torch.save or safetensors file"


def check_readable(path: Path, what: str, inside: str) -> None:
    """Refuse, in one :class:`CheckpointError` line, a ``path`` that is a folder (pass
    ``inside`` instead), absent, or that cannot be opened for reading."""
    if path.is_dir():
        raise CheckpointError(f"{what} {str(path)!r} is a folder; pass {inside}")
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise CheckpointError(f"{what} {str(path)!r} does not exist") from None
    except OSError as error:
        raise CheckpointError(f"{what} {str(path)!r} cannot be read: {error.strerror or error}") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A file written by ``torch.save``, loaded with ``weights_only=True``."""
    path = Path(path)
    check_readable(path, "checkpoint", "the checkpoint.pth file in it")
    try:
        with torch.serialization.safe_globals(TIMM_CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        blocked = re.search(r"GLOBAL (\S+)", str(error))
        if blocked:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds Python objects ({blocked.group(1)}) besides tensors, which are "
                "never loaded (weights only); it was not written by evit_patch"
            ) from None
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated, or not a PyTorch checkpoint "
                              f"({file_kind(path)}); resume from an earlier checkpoint or start again") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        detail = "empty" if isinstance(error, EOFError) else file_kind(path)
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated ({detail}); resume from an "
                              "earlier checkpoint or start again") from None


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint a run wrote: model, optimizer, schedule, scaler, position and RNG
    state. Weights alone (a state_dict, a safetensors file) are refused with the recipe
    key that starts from them instead."""
    state = load_checkpoint(path)
    if isinstance(state, Mapping) and all(key in state for key in TRAINING_CHECKPOINT_KEYS):
        return dict(state)
    start_from = f"to start a new run from these weights, set model.checkpoint: {str(path)!r}"
    if isinstance(state, Mapping) and state and all(isinstance(value, torch.Tensor) for value in state.values()):
        kind = file_kind(path)
        what = kind if kind == "a safetensors weights file" else "a bare state_dict"
        raise CheckpointError(
            f"--resume {str(path)!r} is {what} ({len(state)} tensors, model weights only), not a training "
            f"checkpoint; resume needs the checkpoint.pth a run writes, or {start_from}")
    if isinstance(state, Mapping):
        missing = [key for key in TRAINING_CHECKPOINT_KEYS if key not in state]
        raise CheckpointError(f"--resume {str(path)!r} is not a training checkpoint of evit_patch (it has no "
                              f"{missing} entries); resume needs the checkpoint.pth a run writes")
    raise CheckpointError(f"--resume {str(path)!r} holds a {type(state).__name__}, not a training checkpoint; "
                          "resume needs the checkpoint.pth a run writes")


def load_state_exactly(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, expected: str) -> None:
    """``model.load_state_dict(state)`` after checking that every key and shape fits, so a
    mismatch is one line naming the first difference rather than torch's list of them all.

    ``source`` names the file, ``expected`` what the recipe asks for."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    shapes = [(key, tuple(state[key].shape), tuple(own[key].shape)) for key in own
              if key in state and isinstance(state[key], torch.Tensor) and state[key].shape != own[key].shape]
    if shapes:
        key, theirs, ours = shapes[0]
        raise CheckpointError(
            f"{source} holds weights of another model: {key} is {list(theirs)} there and {list(ours)} in "
            f"{expected} ({len(shapes)} tensor(s) differ in shape); use the recipe the weights were written with")
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit {expected}: {len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} "
            f"unexpected key(s) {unexpected[:3]}; check model.name and model.kwargs")
    model.load_state_dict(state)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """A state_dict from ``.safetensors`` or a weights-only ``.pth``/``.pt``: an evit_patch
    training checkpoint's ``model`` entry; from a timm ``train.py`` checkpoint, as timm's
    own ``load_checkpoint`` takes it, ``state_dict_ema`` when present, else ``state_dict``,
    with DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        check_readable(path, "weights file", "the .safetensors file in it")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"weights file {str(path)!r} is not a readable safetensors file "
                                  f"({' '.join(str(error).split())})") from None
    else:
        state = load_checkpoint(path)
        if not isinstance(state, Mapping):
            raise CheckpointError(f"weights file {str(path)!r} holds a {type(state).__name__}, not a state_dict")
        if all(key in state for key in TRAINING_CHECKPOINT_KEYS):  # a run of evit_patch: its model, not its EMA
            state = state["model"]
        else:  # a state_dict, or timm's train.py checkpoint: timm picks the entry and strips wrapper prefixes
            with torch.serialization.safe_globals(TIMM_CHECKPOINT_GLOBALS):
                state = timm.models.load_state_dict(str(path), use_ema=True, weights_only=True)
    load_state_exactly(model, state, f"weights file {str(path)!r}", "the recipe's model")


def save_weights(model: nn.Module, path: str | Path) -> None:
    """The model's state_dict as safetensors (shared tensors stored once), written atomically."""
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    _write_atomic(lambda temporary: save_file(state, temporary), path)
