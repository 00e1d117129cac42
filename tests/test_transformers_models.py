"""The one-line patch on Hugging Face transformers ViTs (ViT, DeiT with its teacher head,
DINOv2, DINOv2 with registers), built from small configs with random weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference_evit import kept_count
from reference_families import transformers_reference

import evit_patch
from evit_patch.core.model_info import prefix_token_count, transformer_blocks

transformers = pytest.importorskip("transformers")  # CI installs the extra; a plain install skips

SMALL = {"hidden_size": 48, "num_hidden_layers": 4, "num_attention_heads": 3, "image_size": 32, "patch_size": 8}
LAYERS = [1, 2]


def _vit(**extra):
    return transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, intermediate_size=96,
                                                                         num_labels=5, **extra))


def _deit_teacher(**extra):
    return transformers.DeiTForImageClassificationWithTeacher(
        transformers.DeiTConfig(**SMALL, intermediate_size=96, num_labels=5, **extra))


def _dinov2(**extra):
    return transformers.Dinov2Model(transformers.Dinov2Config(**SMALL, mlp_ratio=2, layerscale_value=0.7, **extra))


def _dinov2_registers(**extra):
    return transformers.Dinov2WithRegistersForImageClassification(transformers.Dinov2WithRegistersConfig(
        **SMALL, mlp_ratio=2, layerscale_value=0.7, num_register_tokens=4, num_labels=5, **extra))


def _vit_head(model, x):
    return model.classifier(model.vit.layernorm(x)[:, 0])


def _deit_teacher_head(model, x):
    y = model.deit.layernorm(x)
    return (model.cls_classifier(y[:, 0]) + model.distillation_classifier(y[:, 1])) / 2


def _dinov2_head(model, x):
    return model.layernorm(x)


def _dinov2_registers_head(model, x):
    y = model.dinov2_with_registers.layernorm(x)
    patches = y[:, 1 + model.config.num_register_tokens:]
    return model.classifier(torch.cat([y[:, 0], patches.mean(dim=1)], dim=1))


# name: (builder, prefix tokens, the reference's head on the final hidden states, the output read)
CASES = {
    "vit": (_vit, 1, _vit_head, "logits"),
    "deit-teacher": (_deit_teacher, 2, _deit_teacher_head, "logits"),
    "dinov2": (_dinov2, 1, _dinov2_head, "last_hidden_state"),
    "dinov2-registers": (_dinov2_registers, 5, _dinov2_registers_head, "logits"),
}


def build(name: str, dtype=torch.float64, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return CASES[name][0](**extra).to(dtype).eval()


def images(dtype=torch.float64, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def output(model, name: str, x: torch.Tensor) -> torch.Tensor:
    return getattr(model(x), CASES[name][3])


def reference(model, name: str, x: torch.Tensor, keep_rate: float, fuse: bool) -> tuple[torch.Tensor, list[int]]:
    hidden, counts = transformers_reference(model, x, LAYERS, keep_rate, fuse, CASES[name][1])
    return CASES[name][2](model, hidden), counts


def layer_counts(model, x: torch.Tensor, name: str) -> tuple[torch.Tensor, list[int]]:
    counts: list[int] = []
    hooks = [block.register_forward_hook(lambda m, i, o: counts.append(o.shape[1]))
             for block in transformer_blocks(model)]
    result = output(model, name, x)
    for hook in hooks:
        hook.remove()
    return result, counts


def snapshot(model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("keep_rate", [0.7, 0.5])
@pytest.mark.parametrize("fuse", [True, False])
def test_patched_model_matches_the_eager_reference(name: str, keep_rate: float, fuse: bool) -> None:
    """Outputs and the token count after every layer equal the float64 reference's; the
    prefix tokens (DeiT's distillation token, DINOv2's registers) are never ranked or fused."""
    model, x = build(name), images()
    with torch.no_grad():
        expected, expected_counts = reference(model, name, x, keep_rate, fuse)
        evit_patch.apply_evit(model, LAYERS, keep_rate, fuse=fuse)
        actual, counts = layer_counts(model, x, name)
    prefix = CASES[name][1]
    assert prefix_token_count(model) == prefix
    n = 16
    for index in range(4):
        if index in LAYERS:
            keep = kept_count(n, keep_rate)
            n = keep + (1 if fuse and keep < n else 0)
        assert counts[index] == prefix + n
    assert counts == expected_counts
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["vit", "dinov2-registers"])
def test_gradients_match_the_reference(name: str) -> None:
    """The fused token's weights carry gradient into the scores, as in the paper's code."""
    model, x = build(name), images()
    reference_model = build(name)
    expected, _ = reference(reference_model, name, x, 0.5, True)
    expected.square().sum().backward()
    evit_patch.apply_evit(model, LAYERS, 0.5)
    output(model, name, x).square().sum().backward()
    mine = dict(model.named_parameters())
    for key, parameter in reference_model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(mine[key].grad, parameter.grad, rtol=1e-8, atol=1e-10, msg=key)


@pytest.mark.parametrize("name", list(CASES))
def test_keep_rate_one_is_the_identity_and_removal_is_exact(name: str) -> None:
    """At keep 1.0 outputs are bitwise the unpatched model's; state_dict keys, their order
    and values do not change; after removal the original layers are back."""
    model, x = build(name, torch.float32), images(torch.float32)
    before, originals = snapshot(model), list(transformer_blocks(model))
    with torch.no_grad():
        expected = output(model, name, x)
        evit_patch.apply_evit(model, LAYERS, 1.0)
        assert list(model.state_dict()) == list(before)
        assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
        assert torch.equal(output(model, name, x), expected)
        evit_patch.set_keep_rate(model, 0.5)
        assert not torch.equal(output(model, name, x)[:, :1], expected[:, :1])
        evit_patch.remove_evit(model)
        assert all(a is b for a, b in zip(transformer_blocks(model), originals))
        assert torch.equal(output(model, name, x), expected)


@pytest.mark.parametrize("implementation, fused_calls", [("sdpa", 4), ("eager", 0)])
def test_the_models_own_attention_implementation_runs(monkeypatch, implementation: str, fused_calls: int) -> None:
    """SDPA stays SDPA (every layer, patched or not), eager stays eager; a later switch of
    implementation is followed; the tokens kept are the same."""
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
    model, x = build("vit", attn_implementation=implementation), images()
    evit_patch.apply_evit(model, LAYERS, 0.5)
    calls.clear()
    with torch.no_grad():
        logits = model(x).logits
    assert len(calls) == fused_calls
    model.set_attn_implementation("eager" if implementation == "sdpa" else "sdpa")
    calls.clear()
    with torch.no_grad():  # transformers' eager softmax runs in float32
        torch.testing.assert_close(model(x).logits, logits, rtol=1e-5, atol=1e-6)
    assert len(calls) == 4 - fused_calls


def test_scores_are_float32_under_bf16_autocast() -> None:
    """Under CPU bf16 autocast the kept tokens are the top-k of float32 class attention
    from the layer's own (bf16) queries and keys, not of a bf16-rounded ranking."""
    model, x = build("vit", torch.float32), images(torch.float32, batch=4)
    captured = {}
    attention = model.vit.layers[1].attention
    hooks = [attention.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
             attention.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))]
    evit_patch.apply_evit(model, [1], 0.5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    for hook in hooks:
        hook.remove()
    q, k = (captured[key].float().view(4, 17, 3, 16).transpose(1, 2) for key in ("q", "k"))
    scores = ((q[:, :, :1] @ k.transpose(-2, -1)) / 4).softmax(-1).mean(1)[:, 0, 1:]
    kept = evit_patch.kept_tokens(model)[0].kept_index
    assert torch.equal(kept, scores.topk(kept.shape[1], dim=1).indices)


@pytest.mark.parametrize("builder, reason", [
    (lambda: transformers.BeitForImageClassification(transformers.BeitConfig(
        **SMALL, use_relative_position_bias=True, use_shared_relative_position_bias=True)), "not both"),
    (lambda: transformers.Data2VecVisionForImageClassification(transformers.Data2VecVisionConfig(**SMALL)),
     "relative position bias"),
])
def test_relative_position_families_are_refused_untouched(builder, reason: str) -> None:
    torch.manual_seed(0)
    model = builder().eval()
    x = images(torch.float32)
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x).logits
    with pytest.raises(evit_patch.UnsupportedModelError, match=reason):
        evit_patch.apply_evit(model, LAYERS, 0.5)
    assert not evit_patch.is_patched(model)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x).logits, expected)


@pytest.mark.parametrize("layers, keep_rate, error", [
    ([4], 0.5, ValueError), ([1, 1], 0.5, ValueError), ([1], 0.0, ValueError), ([1], 1.5, ValueError),
    ([1], "half", TypeError),
])
def test_bad_arguments_leave_the_model_untouched(layers, keep_rate, error) -> None:
    model, x = build("deit-teacher", torch.float32), images(torch.float32)
    before, originals = snapshot(model), list(transformer_blocks(model))
    with torch.no_grad():
        expected = model(x).logits
    with pytest.raises(error):
        evit_patch.apply_evit(model, layers, keep_rate)
    assert not evit_patch.is_patched(model)
    assert all(a is b for a, b in zip(transformer_blocks(model), originals))
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x).logits, expected)


def test_a_mask_is_refused_and_output_flags_are_taken() -> None:
    model, x = build("vit", torch.float32), images(torch.float32)
    evit_patch.apply_evit(model, LAYERS, 0.5)
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
        with pytest.raises(ValueError, match="attention_mask"):
            model.vit(x, attention_mask=torch.arange(17).expand(2, 17) < 12)
    assert hidden[0].shape[1] == 17


def analytic_macs(layers: list[int], keep_rate: float, fuse: bool, prefix: int, classes: int) -> int:
    """Linear layers, attention matmuls and layer norms (5 per element, as fvcore counts):
    attention on each layer's input tokens, the MLP on its output tokens; a layer that
    drops tokens adds the class token's attention row (one query against every key) and
    the fused token's weighted sum."""
    dim, hidden, patches = 48, 96, 16
    n, tokens_in, tokens_out, selection = patches, [], [], 0
    for index in range(4):
        tokens_in.append(prefix + n)
        if index in layers and kept_count(n, keep_rate) < n:
            selection += (prefix + n) * dim + (n * dim if fuse else 0)
            n = kept_count(n, keep_rate) + (1 if fuse else 0)
        tokens_out.append(prefix + n)
    heads = 2 if prefix == 2 else 1  # DeiT's teacher model: class and distillation heads
    total = patches * 8 * 8 * 3 * dim + 5 * tokens_out[-1] * dim + dim * classes * heads + selection
    for n_attn, n_mlp in zip(tokens_in, tokens_out):
        total += n_attn * dim * 4 * dim + 2 * n_attn * n_attn * dim + 5 * n_attn * dim
        total += 2 * n_mlp * dim * hidden + 5 * n_mlp * dim
    return total


@pytest.mark.parametrize("name, keep_rate, fuse", [("vit", 1.0, True), ("vit", 0.7, True), ("deit-teacher", 0.5, False)])
def test_count_macs_is_the_cost_of_the_tokens_really_run(name: str, keep_rate: float, fuse: bool) -> None:
    model = build(name, torch.float32)
    evit_patch.apply_evit(model, LAYERS, keep_rate, fuse=fuse)
    assert evit_patch.count_macs(model) == analytic_macs(LAYERS, keep_rate, fuse, CASES[name][1], 5)


def test_keep_rate_for_budget_meets_the_budget() -> None:
    """The largest keep rate within the cost of keep 0.6 keeps as many tokens at the first
    layer as keep 0.6 does; the model itself is not patched."""
    model = build("dinov2-registers", torch.float32)
    budget = evit_patch.count_macs(evit_patch.apply_evit(build("dinov2-registers", torch.float32), LAYERS, 0.6))
    rate = evit_patch.keep_rate_for_budget(model, budget, LAYERS)
    assert not evit_patch.is_patched(model)
    assert 0.5 < rate < 1.0 and math.ceil(rate * 16) == math.ceil(0.6 * 16)
    assert evit_patch.count_macs(evit_patch.apply_evit(build("dinov2-registers", torch.float32), LAYERS, rate)) <= budget


def test_attention_dropout_follows_train_and_eval() -> None:
    """The attention function's dropout is the config's while training and off in eval,
    read at run time (not frozen when the attention was traced)."""
    model, x = build("vit", torch.float32, attention_probs_dropout_prob=0.5), images(torch.float32)
    with torch.no_grad():
        expected = model(x).logits
        evit_patch.apply_evit(model, LAYERS, 1.0)
        assert torch.equal(model(x).logits, expected)
        model.train()
        torch.manual_seed(0)
        first = model(x).logits
        assert not torch.equal(model(x).logits, first)
        evit_patch.remove_evit(model)
        torch.manual_seed(0)
        assert torch.equal(model(x).logits, first)  # the same dropout draws as the unpatched model's


@pytest.mark.parametrize("name", CASES)
def test_hidden_states_keep_one_entry_per_layer(name: str) -> None:
    """transformers records ``hidden_states`` with hooks on its own layer class, which a rewritten
    layer is not: each gets the hook of the layer it replaces, so the tuple has an entry for every
    layer, each that layer's output as the eager reference computes it (reduced after the first
    reorganization), whether transformers had hooked the model before the patch or not."""
    model = build(name)
    x = images()
    states: list[torch.Tensor] = []
    transformers_reference(model, x, LAYERS, 0.7, True, CASES[name][1], states=states)
    for hooked_before in (False, True):
        candidate = copy.deepcopy(model)
        if hooked_before:
            candidate(x, output_hidden_states=True)
        evit_patch.apply_evit(candidate, LAYERS, 0.7)
        hidden = candidate(x, output_hidden_states=True).hidden_states
        assert [state.shape for state in hidden] == [state.shape for state in states]
        for state, expected in zip(hidden, states):
            torch.testing.assert_close(state, expected)
        evit_patch.remove_evit(candidate)
        unpatched = model(x, output_hidden_states=True).hidden_states
        assert all(torch.equal(a, b) for a, b in zip(candidate(x, output_hidden_states=True).hidden_states, unpatched))
        assert len(candidate(x, output_hidden_states=True).hidden_states) == len(unpatched)
