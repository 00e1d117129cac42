"""DynamicViT pruning: masks while training, exact token counts at inference, surgery."""

import copy

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

import evit_patch
import evit_patch.dynamicvit.stages as stages
from evit_patch import UnsupportedModelError
from evit_patch.dynamicvit import (
    apply_dynamicvit,
    dynamicvit_extra_parameters,
    dynamicvit_state,
    is_dynamicvit,
    remove_dynamicvit,
)
from evit_patch.train.checkpoint import load_weights, save_weights


def small_vit(name: str = "deit_tiny_patch16_224", **kwargs) -> nn.Module:
    """16 image tokens (64 px, 16 px patches), 6 blocks."""
    torch.manual_seed(0)
    return timm.create_model(name, **{"img_size": 64, "depth": 6, **kwargs})


def images(batch: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def tokens_entering_blocks(model: nn.Module, x: torch.Tensor) -> list[int]:
    counts = []
    handles = [block.register_forward_pre_hook(lambda module, args: counts.append(args[0].shape[1]))
               for block in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_deit_s_inference_keeps_exactly_137_96_67_image_tokens() -> None:
    model = apply_dynamicvit(timm.create_model("deit_small_patch16_224"), layers=(3, 6, 9), keep_rate=0.7).eval()
    counts = tokens_entering_blocks(model, torch.randn(2, 3, 224, 224))
    assert counts == [197] * 3 + [1 + 137] * 3 + [1 + 96] * 3 + [1 + 67] * 3
    kept = dynamicvit_state(model).record.kept_indices
    assert [index.shape for index in kept] == [(2, 137), (2, 96), (2, 67)]


@pytest.mark.parametrize("name, prefix", [("deit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2),
                                          ("vit_small_patch14_reg4_dinov2", 5)])
def test_inference_keeps_int_n_rho_to_the_s_and_every_prefix_token(name, prefix) -> None:
    kwargs = {"img_size": 56} if "dinov2" in name else {}
    model = apply_dynamicvit(small_vit(name, **kwargs), layers=[1, 3, 4], keep_rate=0.6).eval()
    n = model.patch_embed.num_patches
    expected = [int(n * 0.6), int(n * 0.36), int(n * 0.216)]
    counts = tokens_entering_blocks(model, images(size=kwargs.get("img_size", 64)))
    # a stage block already runs on the shorter sequence
    assert counts == [prefix + n] + [prefix + expected[0]] * 2 + [prefix + expected[1]] + [prefix + expected[2]] * 2
    kept = dynamicvit_state(model).record.kept_indices
    for earlier, later in zip(kept, kept[1:]):  # each stage keeps a subset of the previous one
        assert all(set(b.tolist()) <= set(a.tolist()) for a, b in zip(earlier, later))


def test_a_stage_passes_prefix_tokens_through_and_gathers_the_kept_image_tokens() -> None:
    model = apply_dynamicvit(small_vit("deit_tiny_distilled_patch16_224"), layers=[1, 3], keep_rate=0.5).eval()
    leaving, entering = [], []
    model.blocks[2].register_forward_hook(lambda module, args, output: leaving.append(output))
    model.blocks[3].register_forward_pre_hook(lambda module, args: entering.append(args[0]))  # after the stage's
    with torch.no_grad():
        model(images())
    before, after = leaving[0], entering[0]
    kept = dynamicvit_state(model).record.kept_indices
    position_in_stage_0 = [[row.tolist().index(i) for i in later.tolist()] for row, later in zip(kept[0], kept[1])]
    assert torch.equal(after[:, :2], before[:, :2])
    assert torch.equal(after[:, 2:], torch.stack([b[2:][p] for b, p in zip(before, position_in_stage_0)]))


def train_forward(model: nn.Module, x: torch.Tensor, attention_blocks=()) -> tuple[torch.Tensor, list]:
    probabilities = []
    handles = [model.blocks[index].attn.attn_drop.register_forward_hook(
        lambda module, args, output: probabilities.append(args[0])) for index in attention_blocks]
    try:
        output = model.train()(x)
    finally:
        for handle in handles:
            handle.remove()
    return output, probabilities


def test_training_masks_are_binary_monotone_and_hide_dropped_keys() -> None:
    model = small_vit("deit_tiny_distilled_patch16_224", drop_rate=0.0)
    for block in model.blocks:
        block.attn.fused_attn = False  # materialized attention, to read its rows
    apply_dynamicvit(model, layers=[1, 3, 4], keep_rate=0.5)
    torch.manual_seed(0)
    _, probabilities = train_forward(model, images(4), attention_blocks=range(1, 6))
    state = dynamicvit_state(model)
    policies = state.record.policies
    assert len(policies) == 3 and all(policy.shape == (4, 16) for policy in policies)
    for policy in policies:
        assert set(policy.unique().tolist()) <= {0.0, 1.0}
    for earlier, later in zip(policies, policies[1:]):
        assert torch.all(later <= earlier)  # a dropped token never comes back
    weights = state.key_weights.weights
    assert torch.equal(weights, torch.cat([torch.ones(4, 2), policies[-1]], dim=1))  # prefix always kept
    # blocks 1, 2 read stage 0's policy, block 3 stage 1's, blocks 4, 5 stage 2's
    for rows, policy in zip(probabilities, [policies[0], policies[0], policies[1], policies[2], policies[2]]):
        keys = torch.cat([torch.ones(4, 2), policy], dim=1)
        torch.testing.assert_close(rows.sum(-1), torch.ones_like(rows.sum(-1)), rtol=0, atol=1e-5)
        off_diagonal = ~torch.eye(18, dtype=torch.bool)
        dropped_keys = (keys == 0)[:, None, None, :] & off_diagonal
        assert torch.all(rows[dropped_keys.expand_as(rows)] == 0)
        assert torch.all(rows[(keys > 0)[:, None, None, :].expand_as(rows)] > 0)
        kept_count = keys.sum(1)
        assert torch.all((rows[:, :, 0] > 0).sum(-1) == kept_count[:, None])  # class token reads the kept ones


def test_training_keeps_the_sequence_and_gradients_reach_every_predictor() -> None:
    model = apply_dynamicvit(small_vit(), layers=[1, 3, 4], keep_rate=0.7)
    counts = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: counts.append(args[0].shape[1]))
    torch.manual_seed(0)
    output, _ = train_forward(model, images())
    assert counts == [17] * 6
    record = dynamicvit_state(model).record
    (output.logsumexp(-1).mean() + sum(policy.mean() for policy in record.policies)).backward()
    for parameter in model.dynamicvit_predictors.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_inference_equals_training_restricted_to_the_kept_tokens(monkeypatch) -> None:
    """With decisions equal to inference's top-k choice, masking in training and removing
    at inference compute the same logits: masked keys are exactly what removal takes away."""
    model = small_vit("deit_tiny_distilled_patch16_224").double()
    apply_dynamicvit(model, layers=[1, 3, 4], keep_rate=0.6)
    state = dynamicvit_state(model)
    state.key_weights.eps = 0.0  # else masked rows sum to 1 - O(eps)
    x = images().double()
    with torch.no_grad():
        expected = model.eval()(x)
    kept = [indices.clone() for indices in state.record.kept_indices]

    def top_k_decisions(log_probabilities: torch.Tensor) -> torch.Tensor:
        record = state.record
        stage = len(record.policies)
        previous = record.policies[-1] if stage else torch.ones_like(log_probabilities[..., 0])
        scores = log_probabilities[..., 0].masked_fill(previous == 0, float("-inf"))
        chosen = scores.topk(state.kept_count(record.num_image_tokens, stage), dim=1).indices
        return torch.zeros_like(previous).scatter(1, chosen, 1.0)

    monkeypatch.setattr(stages, "gumbel_keep_decisions", top_k_decisions)
    with torch.no_grad():
        logits = model.train()(x)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    for policy, indices in zip(state.record.policies, kept):
        assert [sorted(row.nonzero().flatten().tolist()) for row in policy] == \
               [sorted(row.tolist()) for row in indices]


def test_extra_parameters_are_the_predictors_and_in_the_state_dict() -> None:
    model = small_vit()
    keys = list(model.state_dict())
    apply_dynamicvit(model, layers=[1, 3, 4])
    added = [key for key in model.state_dict() if key not in keys]
    assert all(key.startswith("dynamicvit_predictors.") for key in added)
    width = 192  # DeiT-Ti: LN + C*C + C*C/2 + C/2*C/4 + C/4*2, with biases, per stage
    per_stage = 2 * width + width * width + width + width * 96 + 96 + 96 * 48 + 48 + 48 * 2 + 2
    assert dynamicvit_extra_parameters(model) == 3 * per_stage
    assert sum(model.state_dict()[key].numel() for key in added) == 3 * per_stage


def test_state_dict_round_trip_through_safetensors(tmp_path) -> None:
    model = apply_dynamicvit(small_vit(), layers=[1, 3], keep_rate=0.5)
    with torch.no_grad():
        for parameter in model.dynamicvit_predictors.parameters():
            parameter.add_(torch.randn_like(parameter))
    save_weights(model, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    other = apply_dynamicvit(timm.create_model("deit_tiny_patch16_224", img_size=64, depth=6), layers=[1, 3],
                             keep_rate=0.5)
    load_weights(other, tmp_path / "model.safetensors")
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(model.state_dict())
    with torch.no_grad():
        assert torch.equal(other.eval()(images()), model.eval()(images()))
    assert torch.equal(dynamicvit_state(other).record.kept_indices[1], dynamicvit_state(model).record.kept_indices[1])


def test_remove_gives_bitwise_original_outputs_after_training() -> None:
    model = small_vit(drop_path_rate=0.1)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    apply_dynamicvit(model, layers=[1, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(images()).logsumexp(-1).mean().backward()
    optimizer.step()
    copied = copy.deepcopy(model)  # after a training forward: the record is not copied
    assert is_dynamicvit(copied) and dynamicvit_state(copied).record.policies == []
    remove_dynamicvit(model)
    assert not is_dynamicvit(model) and not hasattr(model, "dynamicvit_predictors")
    assert list(model.state_dict()) == keys
    assert all(type(a.attn) is type(b.attn) for a, b in zip(model.blocks, reference.blocks))
    reference.load_state_dict(model.state_dict())
    model.eval(), reference.eval()
    assert torch.equal(model(images()), reference(images()))


def test_copies_and_two_models_do_not_share_decisions() -> None:
    model = apply_dynamicvit(small_vit(), layers=[1, 3]).eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        model(images(2))
        twin(images(5))
    assert dynamicvit_state(model).record.kept_indices[0].shape[0] == 2
    assert dynamicvit_state(twin).record.kept_indices[0].shape[0] == 5
    assert twin.blocks[2].attn.key_weights is dynamicvit_state(twin).key_weights
    assert dynamicvit_state(model).key_weights is not dynamicvit_state(twin).key_weights


def test_deit_s_costs_the_published_flops_plus_its_predictors() -> None:
    """Paper: 2.9 GFLOPs at rho 0.7. The predictors run on 196, 137 and 96 tokens: per
    token C^2 + C^2/2 + C^2/8 + C/2 multiply-adds (and the LayerNorm, 5 per channel in
    fvcore's count)."""
    model = apply_dynamicvit(timm.create_model("deit_small_patch16_224"), keep_rate=0.7)
    width = 384
    per_token = width * width + width * width // 2 + width * width // 8 + width // 2 + 5 * width
    predictors = (196 + 137 + 96) * per_token
    total = evit_patch.count_macs(model)
    assert round((total - predictors) / 1e9, 1) == 2.9
    assert total < 0.66 * evit_patch.count_macs(remove_dynamicvit(model))


@pytest.mark.parametrize("layers, keep_rate, error, message", [
    ([1, 6], 0.7, ValueError, r"block index 6 is out of range; the model has blocks 0..5"),
    ([3, 3], 0.7, ValueError, "must not repeat"),
    ([], 0.7, ValueError, "at least one block"),
    ([1.5], 0.7, TypeError, "integers"),
    ([1], 0.0, ValueError, r"keep_rate must be in \(0, 1\]"),
    ([1], 1.5, ValueError, r"keep_rate must be in \(0, 1\]"),
    ([1], "0.7", TypeError, "keep_rate must be a float"),
    ([1], True, TypeError, "keep_rate must be a float"),
])
def test_bad_arguments_name_the_problem_and_leave_the_model_as_it_was(layers, keep_rate, error, message) -> None:
    model = small_vit()
    before, attentions = snapshot(model), [block.attn for block in model.blocks]
    with pytest.raises(error, match=message):
        apply_dynamicvit(model, layers=layers, keep_rate=keep_rate)
    assert not is_dynamicvit(model) and not hasattr(model, "dynamicvit_predictors")
    assert [block.attn for block in model.blocks] == attentions
    assert all(not block._forward_pre_hooks for block in model.blocks)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("build, message", [
    (lambda: small_vit("vit_tiny_patch16_224", global_pool="avg", class_token=False), "class-token head"),
    (lambda: small_vit("vit_tiny_patch16_224", global_pool="avg"), "global_pool='avg'"),
    (lambda: timm.create_model("vit_relpos_small_patch16_224", img_size=64, depth=4, class_token=True,
                               global_pool="token"), "relative position bias"),
    (lambda: nn.Sequential(nn.Linear(2, 2)), "no `blocks`"),
])
def test_unsupported_models_are_refused_unchanged(build, message) -> None:
    model = build()
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=message):
        apply_dynamicvit(model, layers=[1])
    assert not is_dynamicvit(model)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_patching_twice_or_over_evit_is_refused() -> None:
    model = apply_dynamicvit(small_vit(), layers=[1])
    with pytest.raises(ValueError, match="already patched with DynamicViT; call remove_dynamicvit"):
        apply_dynamicvit(model, layers=[2])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        apply_dynamicvit("deit", layers=[1])
    evit = evit_patch.apply_evit(small_vit(), [1], 0.5)
    with pytest.raises(ValueError, match="patched with EViT.s token reorganization .*call remove_evit"):
        apply_dynamicvit(evit, layers=[2])
    with pytest.raises(ValueError, match="no DynamicViT pruning; call apply_dynamicvit"):
        remove_dynamicvit(small_vit())


def test_the_former_keep_ratio_keyword_warns_and_still_works() -> None:
    with pytest.warns(DeprecationWarning, match="keep_rate"):
        model = apply_dynamicvit(small_vit(), layers=[1, 3], keep_ratio=0.5)
    assert dynamicvit_state(model).keep_rate == 0.5
    with pytest.warns(DeprecationWarning, match="keep_rate"):
        assert dynamicvit_state(model).keep_ratio == 0.5
