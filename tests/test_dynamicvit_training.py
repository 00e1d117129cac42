"""DynamicViT's loss, optimizer groups, backbone freeze, and the fine-tuning recipe wiring."""

import json
from pathlib import Path

import pytest
import timm
import timm.optim
import timm.scheduler
import torch
import torch.nn.functional as F
from finetune_helpers import tiny_recipe, write_recipe
from safetensors.torch import load_file
from test_distributed import torchrun
from test_finetune import InterruptAfter
from torch import nn

import evit_patch.train.loop as loop
from evit_patch.dynamicvit import (
    DynamicViTLoss,
    apply_dynamicvit,
    dynamicvit_param_groups,
    dynamicvit_state,
    ratio_loss,
    set_backbone_frozen,
    unpruned_copy,
)
from evit_patch.tools.evaluate import main as evaluate_main
from evit_patch.train.assembly import prepare_model
from evit_patch.train.recipe import RecipeError
from evit_patch.train.reproducibility import seed_everything

DYNAMICVIT = {"reduction": {"enabled": False},
              "dynamicvit": {"enabled": True, "layers": [1, 2], "keep_rate": 0.5, "freeze_epochs": 1}}


def patched_model() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=4)
    return apply_dynamicvit(model, layers=[1, 2], keep_rate=0.7)


def images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_ratio_loss_is_the_stage_mean_of_batch_mean_squared_errors() -> None:
    policies = [torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]),
                torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])]
    # stage 0: fractions 0.75, 0.25 vs 0.7; stage 1: 0.25, 0.0 vs 0.49
    expected = (((0.05 ** 2 + 0.45 ** 2) / 2) + ((0.24 ** 2 + 0.49 ** 2) / 2)) / 2
    assert ratio_loss(policies, [0.7, 0.49]).item() == pytest.approx(expected, abs=1e-7)


def test_loss_is_ce_plus_weighted_ratio_kl_and_token_distillation() -> None:
    model = patched_model()
    teacher = unpruned_copy(model)
    targets = torch.tensor([0, 3, 5, 7])
    torch.manual_seed(0)
    logits = model.train()(images())
    loss = DynamicViTLoss(model, teacher, ratio_weight=2.0, distill_weight=0.5, token_distill_weight=0.25)
    total = loss(images(), logits, targets)

    record = dynamicvit_state(model).record
    cross_entropy = -logits.log_softmax(-1)[range(4), targets].mean()
    ratio = sum(sum((p[b].mean() - rho) ** 2 for b in range(4)) / 4
                for p, rho in zip(record.policies, [0.7, 0.49])) / 2
    with torch.no_grad():
        teacher_tokens = teacher.forward_features(images())
        teacher_logits = teacher.forward_head(teacher_tokens)
    teacher_p = teacher_logits.softmax(-1)
    kl = (teacher_p * (teacher_p.log() - logits.log_softmax(-1))).sum() / 4
    kept = record.policies[-1].bool()
    squared = [(record.final_tokens[b, 1:][kept[b]] - teacher_tokens[b, 1:][kept[b]]) ** 2 for b in range(4)]
    tokens = torch.cat(squared).mean()
    torch.testing.assert_close(total, cross_entropy + 2.0 * ratio + 0.5 * kl + 0.25 * tokens, rtol=1e-5, atol=1e-6)
    assert tokens > 0 and kl > 0
    only_ce_and_ratio = DynamicViTLoss(model, None)(images(), logits, targets)
    torch.testing.assert_close(only_ce_and_ratio, cross_entropy + 2.0 * ratio, rtol=1e-5, atol=1e-6)
    soft = DynamicViTLoss(model, None)(images(), logits, F.one_hot(targets, 1000).float())
    torch.testing.assert_close(soft, only_ce_and_ratio, rtol=1e-5, atol=1e-6)


def test_loss_needs_the_training_forward_of_the_same_batch() -> None:
    model = patched_model()
    loss = DynamicViTLoss(model, None)
    with torch.no_grad():
        logits = model.eval()(images())
    with pytest.raises(ValueError, match=r"run the student in train\(\) mode on the same batch"):
        loss(images(), logits, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="has no DynamicViT pruning"):
        DynamicViTLoss(timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2), None)


def test_param_groups_put_the_backbone_at_a_fraction_of_the_scheduled_rate() -> None:
    model = patched_model()
    groups = dynamicvit_param_groups(model, weight_decay=0.05, backbone_lr_scale=0.01)
    optimizer = timm.optim.create_optimizer_v2(groups, opt="adamw", lr=1e-3, weight_decay=0.05)
    scheduler = timm.scheduler.CosineLRScheduler(optimizer, t_initial=10, lr_min=1e-5, t_in_epochs=False)
    predictor_ids = {id(p) for p in model.dynamicvit_predictors.parameters()}
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    for step in (0, 4):
        scheduler.step_update(step)
        scheduled = scheduler._get_lr(step)[0]
        for group in optimizer.param_groups:
            is_predictor = all(id(p) in predictor_ids for p in group["params"])
            assert is_predictor or not any(id(p) in predictor_ids for p in group["params"])
            assert group["lr"] == pytest.approx(scheduled if is_predictor else 0.01 * scheduled)
    assert all(id(p) in predictor_ids for p in optimizer.param_groups[0]["params"])  # logged lr: the predictors'
    no_decay = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    assert id(model.cls_token) in no_decay and id(model.pos_embed) in no_decay
    assert id(model.dynamicvit_predictors[0].embed[1].bias) in no_decay
    assert id(model.dynamicvit_predictors[0].embed[1].weight) not in no_decay
    assert id(model.blocks[0].attn.qkv.weight) not in no_decay


def test_frozen_backbone_does_not_move_and_unfreezing_restores_it() -> None:
    model = patched_model()
    optimizer = torch.optim.AdamW(dynamicvit_param_groups(model, 0.05), lr=1e-2)
    loss = DynamicViTLoss(model, unpruned_copy(model))
    backbone = {name: p.detach().clone() for name, p in model.named_parameters() if "dynamicvit" not in name}
    predictors = [p.detach().clone() for p in model.dynamicvit_predictors.parameters()]
    set_backbone_frozen(model, True)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "dynamicvit" not in n)
    assert all(p.requires_grad for p in model.dynamicvit_predictors.parameters())
    targets = torch.tensor([0, 1, 2, 3])
    loss(images(), model.train()(images()), targets).backward()
    optimizer.step()
    assert all(torch.equal(p, backbone[n]) for n, p in model.named_parameters() if "dynamicvit" not in n)
    assert any(not torch.equal(a, b) for a, b in zip(model.dynamicvit_predictors.parameters(), predictors))
    set_backbone_frozen(model, False)
    assert all(p.requires_grad for p in model.parameters())
    optimizer.zero_grad()
    loss(images(), model(images()), targets).backward()
    optimizer.step()
    assert not torch.equal(model.blocks[0].attn.qkv.weight, backbone["blocks.0.attn.qkv.weight"])


def test_recipe_runs_with_a_frozen_then_trained_backbone(tmp_path, monkeypatch, capsys) -> None:
    recipe = tiny_recipe(tmp_path, {**DYNAMICVIT, "data": {"eval_subset": 64},
                                    "train": {"epochs": 2, "max_steps_per_epoch": 3, "benchmark_batch_size": 8}})
    seed_everything(recipe.train.seed)
    initial = prepare_model(recipe).state_dict()
    saved = []
    original_save = loop.save_atomic
    monkeypatch.setattr(loop, "save_atomic", lambda state, path: (
        saved.append({k: v.clone() for k, v in state["model"].items()}),
        saved.append(state["optimizer"]["param_groups"]), original_save(state, path)))
    run = loop.train(recipe, show_progress=False)
    first, groups, second = saved[0], saved[1], saved[2]
    backbone = [key for key in initial if not key.startswith("dynamicvit_predictors.")]
    predictor = [key for key in initial if key.startswith("dynamicvit_predictors.")]
    assert all(torch.equal(first[key], initial[key]) for key in backbone)  # epoch 1: frozen
    assert any(not torch.equal(first[key], initial[key]) for key in predictor)
    assert any(not torch.equal(second[key], first[key]) for key in backbone)  # epoch 2: trained
    assert sorted({group["lr_scale"] for group in groups}) == [0.01, 1.0]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["keep_rate"] is None for m in metrics)
    evaluate_main([str(run)])
    printed = capsys.readouterr().out
    assert "| unpatched |" in printed and "| DynamicViT keep rate 0.5 |" in printed


@pytest.mark.slow  # three short runs: about 30 s on two cores
def test_resume_reproduces_the_uninterrupted_run_with_ema_and_mixup(tmp_path, monkeypatch) -> None:
    """Gumbel sampling draws from the saved random state: a resumed run ends bitwise equal."""
    overrides = {**DYNAMICVIT, "data": {"mixup": 0.5}, "train": {"epochs": 2, "max_steps_per_epoch": 2,
                                                                 "ema_decay": 0.9}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = loop.train(tiny_recipe(tmp_path / "a", overrides), show_progress=False)
    recipe = tiny_recipe(tmp_path / "b", overrides)
    monkeypatch.setattr(loop, "Interrupt", InterruptAfter(2))  # the first step of epoch 2
    with pytest.raises(SystemExit):
        loop.train(recipe, show_progress=False)
    monkeypatch.undo()
    resumed = loop.train(recipe, resume=str(Path(recipe.train.output_dir) / "checkpoint.pth"), show_progress=False)
    for name in ("model.safetensors", "model_ema.safetensors"):
        expected, actual = load_file(str(straight / name)), load_file(str(resumed / name))
        assert set(expected) == set(actual) and all(torch.equal(expected[k], actual[k]) for k in expected)


def test_recipe_with_both_methods_enabled_is_refused(tmp_path) -> None:
    with pytest.raises(RecipeError, match="dynamicvit.enabled and reduction.enabled are both true.*reduction.enabled: false"):
        tiny_recipe(tmp_path, {"dynamicvit": {"enabled": True}})
    with pytest.raises(RecipeError, match="did you mean 'dynamicvit.keep_rate'"):
        tiny_recipe(tmp_path, {**DYNAMICVIT, "dynamicvit": {"enabled": True, "keep_rat": 0.5}})


def test_torchrun_freezes_and_unfreezes_the_backbone_on_every_process(tmp_path) -> None:
    """Parameters frozen after DDP wrapped the model go unused for some epochs; both
    processes must still end with the same, trained weights."""
    recipe = write_recipe(tmp_path, {**DYNAMICVIT, "data": {"eval_subset": 32},
                                     "train": {"epochs": 2, "max_steps_per_epoch": 1}})
    completed = torchrun(recipe)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0 = load_file(str(tmp_path / "run" / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "run" / "rank1.safetensors"))
    seed_everything(0)
    untrained = prepare_model(tiny_recipe(tmp_path, DYNAMICVIT)).state_dict()
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    assert not torch.equal(rank0["blocks.0.attn.qkv.weight"], untrained["blocks.0.attn.qkv.weight"])
    assert not torch.equal(rank0["dynamicvit_predictors.0.embed.1.weight"],
                           untrained["dynamicvit_predictors.0.embed.1.weight"])
