"""EViT under CPU bf16 autocast: float32 scores decide, the model stays finite and trains.

Under autocast q, k and (with explicit attention) the attention matrix are bf16. Scores
rounded to bf16 would tie many tokens and the cut would be decided by rounding; the
tests below build inputs where that rounding provably changes the kept tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from finetune_helpers import write_recipe
from torch import Tensor, nn

import evit_patch
import evit_patch.train.loop as loop
from evit_patch.core.reduction import selection_reduction
from evit_patch.core.scores import scores_from_qk
from evit_patch.dynamicvit import apply_dynamicvit, dynamicvit_state
from evit_patch.dynamicvit.patch import predictors
from evit_patch.dynamicvit.predictor import KEEP
from evit_patch.reducers import OracleGuided
from evit_patch.tools.finetune import main as finetune_main

LAYERS = [1, 2, 3]
KEEP_RATE = 0.7
TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3, "num_classes": 10}
TOLERANCE = 1e-6  # relative: float32 versus float64 arithmetic on the same bf16 inputs


def _bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _timm_model(seed: int = 0, fused_attention: bool = True) -> nn.Module:
    """timm's initial weights: class attention nearly uniform, so image tokens' scores
    differ by a few percent at most, and bf16 (8 significant bits) ties many of them."""
    torch.manual_seed(seed)
    model = timm.create_model("deit_tiny_patch16_224", **TINY).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused_attention
    return model


def _model(fused_attention: bool = True) -> nn.Module:
    return evit_patch.apply_evit(_timm_model(fused_attention=fused_attention), LAYERS, KEEP_RATE)


def _images(batch: int = 4) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _exact_scores(tensors: tuple) -> Tensor:
    """Class-attention scores in float64 from what the attention computed under autocast:
    the bf16 q and k of fused attention, or the bf16 matrix of explicit attention."""
    q, k, _, matrix = tensors[:4]  # a fifth, the bias, is None here
    if matrix is None:
        matrix = (q.double() @ k.double().transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return matrix[:, :, 0, 1:].double().mean(dim=1)


def _cut_margin(scores: Tensor, kept: Tensor) -> Tensor:
    """Per sample: lowest kept score minus highest unkept one, relative to the largest
    magnitude (negative: some dropped token scores higher than a kept one)."""
    is_kept = torch.zeros_like(scores, dtype=torch.bool).scatter(1, kept, True)
    lowest_kept = scores.masked_fill(~is_kept, math.inf).min(dim=1).values
    highest_dropped = scores.masked_fill(is_kept, -math.inf).max(dim=1).values
    return (lowest_kept - highest_dropped) / scores.abs().max(dim=1).values


def _rounded_choice(tensors: tuple, exact: Tensor, keep: int) -> Tensor:
    """The tokens that scores rounded to bf16 would keep (for explicit attention: the
    head mean taken in bf16)."""
    matrix = tensors[3]
    rounded = exact.to(torch.bfloat16) if matrix is None else matrix[:, :, 0, 1:].mean(dim=1)
    return rounded.topk(keep, dim=1).indices


@pytest.mark.parametrize("fused_attention", [True, False], ids=["sdpa", "explicit"])
def test_bf16_autocast_keeps_the_tokens_float32_scores_pick(fused_attention: bool) -> None:
    model = _model(fused_attention)
    captured = {}
    for index in LAYERS:
        model.blocks[index].attn.register_forward_hook(
            lambda module, args, output, index=index: captured.__setitem__(index, output[1]))
    with torch.no_grad(), _bf16():
        logits = model(_images())
    assert torch.isfinite(logits).all()

    rounding_decides = []
    for index, layer in zip(LAYERS, evit_patch.kept_tokens(model)):
        tensors = captured[index]
        assert (tensors[0] if fused_attention else tensors[3]).dtype == torch.bfloat16  # autocast was on
        exact = _exact_scores(tensors)
        kept = layer.kept_index
        margin = _cut_margin(exact, kept)
        assert (margin >= -TOLERANCE).all(), f"block {index}: a dropped token outscores a kept one, {margin}"
        ordered = exact.gather(1, kept)  # highest score first
        assert (ordered[:, 1:] <= ordered[:, :-1] * (1 + TOLERANCE)).all()
        rounding_decides.append(_cut_margin(exact, _rounded_choice(tensors, exact, kept.shape[1])) < -10 * TOLERANCE)
    # the input is one where bf16 scores would keep other tokens: this test can fail
    assert torch.cat(rounding_decides).float().mean() > 0.5


def test_oracle_guidance_in_bf16_keeps_the_tokens_of_the_oracles_float32_scores() -> None:
    """A student and oracle cast to bf16: the oracle's float32 scores reach the student's
    top-k without being rounded to the student's dtype."""
    reducer = OracleGuided(_timm_model(seed=5), LAYERS[:1])
    student = evit_patch.apply_token_reducer(_timm_model(), LAYERS[:1], KEEP_RATE, reducer).to(torch.bfloat16)
    captured = []
    reducer.oracle.blocks[LAYERS[0]].attn.register_forward_hook(lambda m, args, output: captured.append(output[1]))
    with torch.no_grad():
        assert torch.isfinite(student(_images().to(torch.bfloat16))).all()
    tensors = captured[-1]
    assert tensors[0].dtype == torch.bfloat16
    exact = _exact_scores(tensors)
    kept = evit_patch.kept_tokens(student)[0].kept_index
    assert (_cut_margin(exact, kept) >= -TOLERANCE).all()
    assert (_cut_margin(exact, _rounded_choice(tensors, exact, kept.shape[1])) < -10 * TOLERANCE).any()


def test_dynamicvit_under_bf16_autocast_prunes_by_float32_keep_scores() -> None:
    """DynamicViT's inference top-k ranks the predictor's keep log-probabilities: under CPU
    autocast its last linear layer gives bf16 logits, whose log-softmax must not be
    rounded to bf16 (untrained predictors put every token near log(1/2), ties in bf16)."""
    model = apply_dynamicvit(_timm_model(), layers=LAYERS[:1], keep_rate=KEEP_RATE).eval()
    captured = []
    predictors(model)[0].decide[-2].register_forward_hook(lambda m, args, output: captured.append(output))
    with torch.no_grad(), _bf16():
        assert torch.isfinite(model(_images())).all()
    logits = captured[-1]
    assert logits.dtype == torch.bfloat16
    exact = logits.double().log_softmax(dim=-1)[..., KEEP]
    kept = dynamicvit_state(model).record.kept_indices[0]
    assert (_cut_margin(exact, kept) >= -TOLERANCE).all()
    rounded = logits.log_softmax(dim=-1)[..., KEEP]  # bf16 on the CPU
    assert rounded.dtype == torch.bfloat16
    assert (_cut_margin(exact, rounded.topk(kept.shape[1], dim=1).indices) < -10 * TOLERANCE).any()


def test_fused_token_is_summed_in_float32_and_given_the_tokens_dtype() -> None:
    """Float32 weights against bf16 tokens: the weighted sum is not rounded to bf16 on
    the way (weights or matmul); only the fused token is, like every other token."""
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 1 + 40, 512, generator=generator)
    weights = torch.rand(2, 40, generator=generator) / 40
    kept = weights.topk(10, dim=1).indices
    weights = weights.scatter(1, kept, 0.0)
    exact = torch.einsum("bn,bnc->bc", weights.double(), tokens[:, 1:].double())

    with _bf16():  # float32 tokens (timm's residual stream under autocast): a float32 fused token
        fused = selection_reduction(tokens, 1, kept, weights).tokens[:, -1]
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused.double(), exact, rtol=1e-5, atol=1e-6)

    low = tokens.to(torch.bfloat16)  # a model cast to bf16: a bf16 fused token, correctly rounded
    exact = torch.einsum("bn,bnc->bc", weights.double(), low[:, 1:].double())
    reduction = selection_reduction(low, 1, kept, weights)
    assert reduction.tokens.dtype == torch.bfloat16
    assert (reduction.tokens[:, -1] == exact.to(torch.bfloat16)).float().mean() > 0.99


def test_a_few_bf16_autocast_training_steps_lower_the_loss() -> None:
    """AdamW on one fixed batch, every step under autocast through three reorganizations."""
    model = _model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = _images(16), torch.arange(16) % 10
    losses = []
    for _ in range(8):
        with _bf16():
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < 0.8 * losses[0], losses


def test_finetune_cli_runs_with_bf16_autocast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--set train.amp=bf16`` reaches every training step's autocast; the run finishes
    with finite metrics."""
    used = []
    original = loop.autocast
    monkeypatch.setattr(loop, "autocast", lambda device, amp: (used.append(amp), original(device, amp))[1])
    recipe = write_recipe(tmp_path, {"train": {"epochs": 1, "max_steps_per_epoch": 2}})
    finetune_main([str(recipe), "--set", "train.amp=bf16", "--no-report"])
    assert used == ["bf16", "bf16"]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1
    assert all(math.isfinite(metrics[0][key]) for key in ("train_loss", "top1"))


def test_scores_and_fusion_run_on_devices_without_autocast() -> None:
    """Leaving autocast for the float32 matmuls must not break shape-only (meta) runs."""
    q = torch.randn(2, 3, 10, 4, device="meta")
    for mode in ("class", "mean"):
        assert scores_from_qk(q, q, None, mode, 1).shape == (2, 9)
    tokens, weights = torch.randn(2, 10, 8, device="meta"), torch.rand(2, 9, device="meta")
    kept = torch.zeros(2, 3, dtype=torch.long, device="meta")
    assert selection_reduction(tokens, 1, kept, weights).tokens.shape == (2, 5, 8)
