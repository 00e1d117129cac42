"""``model.checkpoint`` takes what users of timm bring: the checkpoints timm's ``train.py``
writes (its ``CheckpointSaver``: ``state_dict``, ``state_dict_ema``, the command line as
an ``argparse.Namespace``) and state_dicts saved from a DDP-wrapped model (``module.``),
read weights-only."""

from __future__ import annotations

import argparse
import fractions
from pathlib import Path

import pytest
import timm
import torch
from finetune_helpers import TINY, tiny_recipe
from timm.utils import CheckpointSaver, ModelEmaV3

from evit_patch.train.checkpoint import CheckpointError, load_weights
from evit_patch.train.model_source import build_model


def tiny_model() -> torch.nn.Module:
    return timm.create_model(TINY["model"]["name"], **TINY["model"]["kwargs"])


def timm_train_checkpoint(folder: Path, with_ema: bool) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """A checkpoint written by timm's own saver after one optimizer step, and the model and EMA it holds."""
    torch.manual_seed(0)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = ModelEmaV3(model, decay=0.5) if with_ema else None
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    if ema is not None:
        ema.update(model)
    args = argparse.Namespace(model=TINY["model"]["name"], lr=0.5, epochs=1)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder))
    saver.save_checkpoint(epoch=0, metric=1.0)
    return folder / "last.pth.tar", model, (ema.module if ema is not None else model)


def equal_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    theirs = second.state_dict()
    return all(torch.equal(value, theirs[key]) for key, value in first.state_dict().items())


@pytest.mark.parametrize("with_ema", [True, False])
def test_a_recipe_starts_from_a_timm_train_checkpoint(tmp_path, with_ema) -> None:
    """As timm's ``load_checkpoint`` does: the EMA weights when the file has them, else the model's."""
    path, model, expected = timm_train_checkpoint(tmp_path, with_ema)
    assert "args" in torch.load(path, weights_only=False)  # what a plain weights-only load refuses
    recipe = tiny_recipe(tmp_path, {"model": {"checkpoint": str(path)}})
    built = build_model(recipe.model)
    assert equal_weights(built, expected)
    assert with_ema != equal_weights(built, model)  # the EMA differs from the raw model after a step


def test_ddp_prefixes_are_removed(tmp_path) -> None:
    torch.manual_seed(1)
    source = tiny_model()
    torch.save({"state_dict": {f"module.{key}": value for key, value in source.state_dict().items()}},
               tmp_path / "ddp.pth")
    target = tiny_model()
    load_weights(target, tmp_path / "ddp.pth")
    assert equal_weights(target, source)


def test_other_python_objects_are_still_refused(tmp_path) -> None:
    torch.save({"state_dict": tiny_model().state_dict(), "metric": fractions.Fraction(1, 3)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"holds Python objects \(fractions.Fraction\)"):
        load_weights(tiny_model(), tmp_path / "odd.pth")
