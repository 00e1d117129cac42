"""Token labeling in the fine-tuning CLI: a tiny LV-ViT learns from an unpatched LV-ViT teacher."""

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from finetune_helpers import tiny_recipe, write_recipe
from safetensors.torch import load_file
from test_distributed import torchrun
from test_finetune import InterruptAfter

import evit_patch.train.loop as loop
from evit_patch import kept_tokens
from evit_patch.models.token_labeling import token_labeling_loss
from evit_patch.train.assembly import prepare_model
from evit_patch.train.checkpoint import load_weights, save_weights
from evit_patch.train.criterion import TokenLabelingCriterion
from evit_patch.train.recipe import RecipeError

LVVIT = {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 3,
         "num_heads": 2, "stem_chans": 8}
PATCHES = 7 * 7


def lvvit(seed: int, **changes) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("lvvit_s", **{**LVVIT, **changes})


def saved_lvvit(folder: Path, name: str, seed: int, **changes) -> Path:
    path = folder / f"{name}.safetensors"
    save_weights(lvvit(seed, **changes), path)
    return path


def token_labeling_overrides(folder: Path, **token_labeling) -> dict:
    """A tiny LV-ViT student from saved weights, and a differently seeded LV-ViT teacher."""
    return {
        "model": {"name": "lvvit_s", "kwargs": LVVIT, "checkpoint": str(saved_lvvit(folder, "student", 0))},
        "teacher": {"name": "lvvit_s", "kwargs": LVVIT, "checkpoint": str(saved_lvvit(folder, "teacher", 1))},
        "token_labeling": {"enabled": True, **token_labeling},
    }


def token_patches(model: torch.nn.Module) -> torch.Tensor:
    """Which input patch each final image token is (-1: the fused token), by composing the
    kept indices of every reorganization layer."""
    layers = kept_tokens(model)
    patch = torch.arange(PATCHES).expand(len(layers[0].kept_index), PATCHES)
    for layer in layers:
        kept = patch.gather(1, layer.kept_index)
        patch = kept if kept.shape[1] == patch.shape[1] else torch.cat([kept, torch.full((len(kept), 1), -1)], 1)
    return patch


def eager_loss(student, teacher, images, targets, dense_weight: float, cls_weight: float) -> tuple:
    """The class loss and the mean loss of the kept tokens against the teacher's soft
    labels of their patches, written out."""
    with torch.no_grad():
        cls_logits, aux_logits = student.forward_dense(images)
        teacher_labels = teacher.eval().forward_dense(images)[1].softmax(dim=-1)
    owner = token_patches(student)
    per_token = [-(teacher_labels[b, owner[b, t]] * aux_logits[b, t].log_softmax(-1)).sum()
                 for b in range(len(owner)) for t in range(owner.shape[1]) if owner[b, t] >= 0]
    class_loss = F.cross_entropy(cls_logits, targets)
    return cls_weight * class_loss + dense_weight * torch.stack(per_token).mean(), cls_weight * class_loss


def test_each_step_minimizes_class_plus_weighted_kept_token_loss(tmp_path, monkeypatch) -> None:
    overrides = token_labeling_overrides(tmp_path, dense_weight=0.3, cls_weight=0.8)
    recipe = tiny_recipe(tmp_path, {**overrides, "train": {"epochs": 1, "max_steps_per_epoch": 3}})
    steps = []
    original = TokenLabelingCriterion.__call__

    def spy(self, model, images, targets):
        before = copy.deepcopy(model)
        loss = original(self, model, images, targets)
        steps.append((before, images.clone(), targets.clone(), loss.item()))
        return loss

    monkeypatch.setattr(TokenLabelingCriterion, "__call__", spy)
    run = loop.train(recipe, show_progress=False)

    assert len(steps) == 3
    teacher = lvvit(0)
    load_weights(teacher, recipe.teacher.checkpoint)
    for student, images, targets, loss in steps:
        expected, class_only = eager_loss(student, teacher, images, targets, 0.3, 0.8)
        assert loss == pytest.approx(expected.item(), rel=1e-5)
        assert abs(loss - class_only.item()) > 1e-3  # the dense term is in the loss
    metrics = json.loads((run / "metrics.jsonl").read_text())
    assert metrics["train_loss"] == pytest.approx(sum(step[-1] for step in steps) / 3, rel=1e-9)
    trained, start = load_file(str(run / "model.safetensors")), load_file(recipe.model.checkpoint)
    assert all(torch.isfinite(value).all() for value in trained.values())
    for key in ("head.weight", "aux_head.weight", "blocks.2.mlp.fc2.weight"):
        assert not torch.equal(trained[key], start[key]), key


def test_hard_targets_are_label_smoothed_as_timm_does_for_mixup(tmp_path) -> None:
    recipe = tiny_recipe(tmp_path, {**token_labeling_overrides(tmp_path), "data": {"label_smoothing": 0.2}})
    student, teacher = prepare_model(recipe), lvvit(1).eval()
    criterion = TokenLabelingCriterion(recipe.token_labeling, recipe.data, student, teacher)
    images, targets = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 3, 9])
    smoothed = F.one_hot(targets, 10) * 0.8 + 0.2 / 10
    expected = token_labeling_loss(student, images, smoothed, teacher)
    torch.testing.assert_close(criterion(student, images, targets), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(criterion(student, images, smoothed), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"teacher": None}, r"token labels come from a teacher, and the recipe has none"),
    ({"teacher": {"name": "vit_tiny_patch16_224"}}, r"teacher.name 'vit_tiny_patch16_224' gives no per-token"),
    ({"model": {"name": "vit_tiny_patch16_224"}}, r"model.name 'vit_tiny_patch16_224' has no token-labeling head"),
    ({"teacher": {"checkpoint": None}}, r"the teacher has no trained weights.*teacher.checkpoint"),
    ({"token_labeling": {"dense_weight": -0.5}}, r"token_labeling.dense_weight: a loss weight must be >= 0"),
])
def test_recipe_without_a_usable_teacher_is_refused_at_load(tmp_path, change, message) -> None:
    overrides = token_labeling_overrides(tmp_path)
    for section, values in change.items():
        overrides[section] = None if values is None else {**overrides[section], **values}
    if overrides["teacher"] is None:
        del overrides["teacher"]
    with pytest.raises(RecipeError, match=message):
        tiny_recipe(tmp_path, overrides)


@pytest.mark.parametrize("teacher_change, message", [
    ({"num_classes": 7}, r"the teacher predicts 7 classes, the model 10"),
    ({"patch_size": 2}, r"teacher splits images into a \(14, 14\) grid .* the model into \(7, 7\)"),
])
def test_teacher_that_does_not_label_the_students_patches_is_refused_before_training(
        tmp_path, teacher_change, message) -> None:
    overrides = token_labeling_overrides(tmp_path)
    kwargs = {**LVVIT, **teacher_change}
    overrides["teacher"] = {"name": "lvvit_s", "kwargs": kwargs,
                            "checkpoint": str(saved_lvvit(tmp_path, "other", 1, **teacher_change))}
    recipe = tiny_recipe(tmp_path, overrides)
    with pytest.raises(RecipeError, match=message):
        loop.train(recipe, show_progress=False)
    assert not Path(recipe.train.output_dir).exists()


def test_resume_with_token_labeling_and_mixup_reproduces_the_uninterrupted_run(tmp_path, monkeypatch) -> None:
    overrides = {**token_labeling_overrides(tmp_path), "data": {"mixup": 0.5, "cutmix": 1.0},
                 "train": {"max_steps_per_epoch": 2}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = loop.train(tiny_recipe(tmp_path / "a", overrides), show_progress=False)
    recipe = tiny_recipe(tmp_path / "b", overrides)
    monkeypatch.setattr(loop, "Interrupt", InterruptAfter(3))  # epoch 2, after its first step
    with pytest.raises(SystemExit):
        loop.train(recipe, show_progress=False)
    monkeypatch.undo()
    resumed = loop.train(recipe, resume=str(Path(recipe.train.output_dir) / "checkpoint.pth"), show_progress=False)
    expected = load_file(str(straight / "model.safetensors"))
    actual = load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_token_labeling_under_torchrun_keeps_the_ranks_identical(tmp_path) -> None:
    overrides = {**token_labeling_overrides(tmp_path), "train": {"epochs": 1, "max_steps_per_epoch": 3}}
    completed = torchrun(write_recipe(tmp_path, overrides))
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0 = load_file(str(tmp_path / "run" / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "run" / "rank1.safetensors"))
    start = load_file(str(tmp_path / "student.safetensors"))
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    assert not torch.equal(rank0["aux_head.weight"], start["aux_head.weight"])
