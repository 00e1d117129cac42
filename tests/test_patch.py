"""apply_evit / remove_evit / set_keep_rate behaviour on small timm models."""

import copy

import pytest
import timm
import torch
from torch import nn

import evit_patch
from evit_patch import UnsupportedModelError


def small_deit(name: str = "deit_tiny_patch16_224", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, img_size=64, depth=6, **kwargs)


def images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_state_dict_is_unchanged_and_loads_both_ways() -> None:
    model = small_deit()
    before = snapshot(model)
    evit_patch.apply_evit(model, [1, 3], 0.5)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in before.values())
    plain = small_deit()
    plain.load_state_dict(after)
    model.load_state_dict(plain.state_dict())


def test_remove_evit_gives_bitwise_original_outputs_after_training() -> None:
    model = small_deit(drop_path_rate=0.1)
    reference = copy.deepcopy(model)
    evit_patch.apply_evit(model, [1, 3], 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(images()).logsumexp(-1).mean().backward()
    optimizer.step()
    evit_patch.remove_evit(model)
    reference.load_state_dict(model.state_dict())
    model.eval(), reference.eval()
    assert not evit_patch.is_patched(model)
    assert all(type(a) is type(b) for a, b in zip(model.blocks, reference.blocks))
    assert torch.equal(model(images()), reference(images()))


def test_keep_rate_one_computes_exactly_the_unpatched_model() -> None:
    model = small_deit().eval()
    expected = model(images())
    evit_patch.apply_evit(model, [0, 2, 4], 1.0)
    assert torch.equal(model(images()), expected)


def test_set_keep_rate_changes_token_counts_without_repatching() -> None:
    model = evit_patch.apply_evit(small_deit().eval(), [1, 3], 1.0)
    patched_blocks = list(model.blocks)
    evit_patch.set_keep_rate(model, 0.5)
    model(images())
    assert [t.kept_index.shape[1] for t in evit_patch.kept_tokens(model)] == [8, 5]  # 16 -> 8+1 -> 5+1
    evit_patch.set_keep_rate(model, [1.0, 0.25])
    model(images())
    assert [t.kept_index.shape[1] for t in evit_patch.kept_tokens(model)] == [16, 4]
    assert list(model.blocks) == patched_blocks


def test_prefix_tokens_are_never_reorganized_and_distilled_heads_work() -> None:
    model = small_deit("deit_tiny_distilled_patch16_224")
    evit_patch.apply_evit(model, [1, 3], 0.3)
    seen = []
    for index in (1, 3):
        reorganizer = model.blocks[index].token_reorganizer
        reorganizer.register_forward_hook(lambda m, args, out: seen.append((args[0][:, :2], out[:, :2])))
    model.set_distilled_training(True)
    model.train()
    logits, distilled = model(images())
    assert logits.shape == distilled.shape == (2, 1000)
    model.eval()
    assert model(images()).shape == (2, 1000)
    assert len(seen) == 4 and all(torch.equal(before, after) for before, after in seen)


def test_register_tokens_are_kept() -> None:
    model = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=56, depth=4).eval()
    assert model.num_prefix_tokens == 5
    evit_patch.apply_evit(model, [1], 0.5)
    outputs = []
    model.blocks[1].token_reorganizer.register_forward_hook(lambda m, args, out: outputs.append((args[0], out)))
    model(images(1, 56))
    before, after = outputs[0]
    assert torch.equal(after[:, :5], before[:, :5])
    assert after.shape[1] == 5 + 8 + 1  # 16 patches -> 8 kept + 1 fused


def test_gradients_reach_every_parameter() -> None:
    model = evit_patch.apply_evit(small_deit(), [1, 3], 0.5)
    model.train()
    model(images()).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_train_and_eval_modes_and_drop_path() -> None:
    model = evit_patch.apply_evit(small_deit(drop_path_rate=0.5), [1, 3], 0.5)
    model.train()
    torch.manual_seed(1)
    first = model(images())
    torch.manual_seed(2)
    assert not torch.equal(first, model(images()))  # drop-path is live in training
    model.eval()
    assert torch.equal(model(images()), model(images()))


def test_torch_compile_matches_eager() -> None:
    model = evit_patch.apply_evit(small_deit().eval(), [1, 3], 0.5)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images()), model(images()), rtol=1e-4, atol=1e-5)


def test_attention_mask_is_rejected_with_a_clear_error() -> None:
    model = evit_patch.apply_evit(small_deit().eval(), [1], 0.5)
    with pytest.raises(ValueError, match="attn_mask"):
        model(images(), attn_mask=torch.zeros(17, 17, dtype=torch.bool))


def test_deep_copies_are_independent() -> None:
    model = evit_patch.apply_evit(small_deit().eval(), [1, 3], 0.5)
    ema = copy.deepcopy(model)
    evit_patch.set_keep_rate(ema, 1.0)
    assert model.evit_state.keep_rates == [0.5, 0.5]
    assert ema.blocks[1].token_reorganizer.state is ema.evit_state


BAD_ARGUMENTS = [
    ({"layers": [6]}, ValueError, "out of range"),
    ({"layers": [-1]}, ValueError, "out of range"),
    ({"layers": [1, 1]}, ValueError, "repeat"),
    ({"layers": [1.5]}, TypeError, "integers"),
    ({"layers": [True]}, TypeError, "integers"),
    ({"layers": []}, ValueError, "at least one"),
    ({"layers": "3"}, TypeError, "sequence"),
    ({"keep_rate": 0.0}, ValueError, r"\(0, 1\]"),
    ({"keep_rate": 1.5}, ValueError, r"\(0, 1\]"),
    ({"keep_rate": float("nan")}, ValueError, r"\(0, 1\]"),
    ({"keep_rate": "0.7"}, TypeError, "float"),
    ({"keep_rate": [0.7]}, ValueError, "one per layer"),
    ({"fuse": "yes"}, TypeError, "fuse"),
]


@pytest.mark.parametrize("override, error, message", BAD_ARGUMENTS)
def test_bad_arguments_fail_clearly_and_leave_the_model_untouched(override, error, message) -> None:
    model = small_deit().eval()
    before, output, blocks = snapshot(model), model(images()), list(model.blocks)
    arguments = {"layers": [1, 3], "keep_rate": 0.7, "fuse": True, **override}
    with pytest.raises(error, match=message):
        evit_patch.apply_evit(model, arguments.pop("layers"), arguments.pop("keep_rate"), **arguments)
    assert not evit_patch.is_patched(model)
    assert list(model.blocks) == blocks
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert torch.equal(model(images()), output)


def test_patching_twice_is_an_error_and_keeps_the_first_patch() -> None:
    model = evit_patch.apply_evit(small_deit(), [1], 0.5)
    blocks = list(model.blocks)
    with pytest.raises(ValueError, match="already patched"):
        evit_patch.apply_evit(model, [2], 0.7)
    assert list(model.blocks) == blocks and model.evit_state.layers == [1]


def test_unsupported_block_in_the_middle_leaves_the_model_untouched() -> None:
    model = small_deit().eval()
    model.blocks[3] = timm.models.vision_transformer.ParallelScalingBlock(192, 3)
    before, output, blocks = snapshot(model), model(images()), list(model.blocks)
    with pytest.raises(UnsupportedModelError, match="ParallelScalingBlock"):
        evit_patch.apply_evit(model, [1, 3], 0.5)
    assert list(model.blocks) == blocks and not evit_patch.is_patched(model)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert torch.equal(model(images()), output)


def test_non_vit_models_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="no `blocks`"):
        evit_patch.apply_evit(timm.create_model("resnet10t"), [1], 0.5)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        evit_patch.apply_evit("deit_small_patch16_224", [1], 0.5)
    with pytest.raises(UnsupportedModelError, match="relative position bias shared"):
        evit_patch.apply_evit(timm.create_model("beit_base_patch16_224", depth=2, embed_dim=64, num_heads=2,
                                                use_shared_rel_pos_bias=True), [1], 0.5)


def test_set_keep_rate_and_remove_need_a_patched_model() -> None:
    model = small_deit()
    with pytest.raises(ValueError, match="not patched"):
        evit_patch.set_keep_rate(model, 0.5)
    with pytest.raises(ValueError, match="not patched"):
        evit_patch.remove_evit(model)
    evit_patch.apply_evit(model, [1], 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        evit_patch.set_keep_rate(model, 0)
    assert model.evit_state.keep_rates == [0.5]


def test_dynamic_image_size_reorganizes_at_any_resolution() -> None:
    model = timm.create_model("vit_tiny_patch16_224", depth=4, dynamic_img_size=True).eval()
    evit_patch.apply_evit(model, [1], 0.5)
    for size, patches in ((64, 16), (96, 36), (160, 100)):
        model(images(1, size))
        (layer,) = evit_patch.kept_tokens(model)
        assert layer.token_of_patch.shape[1] == patches
        assert layer.kept_index.shape[1] == patches // 2


def test_keep_rates_stay_with_their_layers_in_any_order() -> None:
    model = evit_patch.apply_evit(small_deit().eval(), [3, 1], [0.9, 0.5])  # block 1 at 0.5, block 3 at 0.9
    assert model.evit_state.layers == [1, 3] and model.evit_state.keep_rates == [0.5, 0.9]
    assert model.keep_rate == [0.5, 0.9]
    with torch.no_grad():
        model(images())
    counts = [layer.kept_index.shape[1] for layer in evit_patch.kept_tokens(model)]
    assert counts == [8, 9]  # 16 patches -> ceil(0.5 * 16) = 8 (+1 fused) -> ceil(0.9 * 9) = 9
