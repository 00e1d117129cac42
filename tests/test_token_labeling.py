"""The token-labeling loss reads exactly the labels of the patches EViT keeps as tokens."""


import pytest
import timm
import torch
import torch.nn.functional as F

import evit_patch
import evit_patch.models  # registers lvvit_* with timm
from evit_patch import KEPT, kept_tokens
from evit_patch.models.token_labeling import label_map_targets, surviving_patch_index, token_labeling_loss

CLASSES = 6
SMALL = dict(img_size=32, patch_size=4, num_classes=CLASSES, embed_dim=24, depth=4, num_heads=2, stem_chans=8)
PATCHES = 8 * 8


def _model(seed: int = 0, layers=(1, 2), keep_rate: float = 0.6, fuse: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("lvvit_s", **SMALL).double().eval()
    if layers:
        evit_patch.apply_evit(model, list(layers), keep_rate, fuse=fuse)
    return model


def _batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=generator)
    targets = torch.randint(CLASSES, (3,), generator=generator)
    patch_labels = torch.randint(CLASSES, (3, PATCHES), generator=generator)
    return images, targets, patch_labels


def _token_patches(model: torch.nn.Module) -> torch.Tensor:
    """Which input patch each final image token is (-1: a fused token), by composing the
    kept indices of every layer: an independent reading of the same provenance."""
    layers = kept_tokens(model)
    patch = torch.arange(PATCHES).expand(len(layers[0].kept_index), PATCHES)
    for layer in layers:
        incoming = patch.shape[1]
        patch = patch.gather(1, layer.kept_index)
        if model.evit_state.reducer.fuse and patch.shape[1] < incoming:
            patch = torch.cat([patch, torch.full((len(patch), 1), -1)], dim=1)
    return patch


def test_loss_is_class_loss_plus_half_the_kept_tokens_loss() -> None:
    model = _model()
    images, targets, patch_labels = _batch()
    loss = token_labeling_loss(model, images, targets, patch_targets=patch_labels)
    with torch.no_grad():
        cls_logits, aux_logits = model.forward_dense(images)
    owner = _token_patches(model)
    assert owner.shape == aux_logits.shape[:2] and (owner == -1).any() and (owner >= 0).any()
    per_token = [F.cross_entropy(aux_logits[b, t], patch_labels[b, owner[b, t]])
                 for b in range(len(owner)) for t in range(owner.shape[1]) if owner[b, t] >= 0]
    expected = F.cross_entropy(cls_logits, targets) + 0.5 * torch.stack(per_token).mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fuse", [True, False])
def test_only_kept_patches_labels_matter(fuse: bool) -> None:
    model = _model(fuse=fuse)
    images, targets, patch_labels = _batch()
    loss = token_labeling_loss(model, images, targets, patch_targets=patch_labels)
    status = kept_tokens(model)[-1].status
    assert (status != KEPT).any() and (status == KEPT).any()

    relabeled = patch_labels.clone()
    relabeled[status != KEPT] = (patch_labels[status != KEPT] + 1) % CLASSES  # fused or dropped patches
    torch.testing.assert_close(token_labeling_loss(model, images, targets, patch_targets=relabeled), loss,
                               rtol=0, atol=0)

    batch, patch = (status == KEPT).nonzero()[0].tolist()
    relabeled = patch_labels.clone()
    relabeled[batch, patch] = (patch_labels[batch, patch] + 1) % CLASSES
    changed = token_labeling_loss(model, images, targets, patch_targets=relabeled)
    assert (changed - loss).abs() > 1e-6


def test_surviving_patch_index_follows_the_tokens() -> None:
    """A kept token at position t is its patch: gathering patch features puts them where the tokens are."""
    model = _model()
    images, _, _ = _batch()
    with torch.no_grad():
        _, aux_logits = model.forward_dense(images)
    index = surviving_patch_index(model, aux_logits)
    last = kept_tokens(model)[-1]
    for b in range(len(index)):
        for t in range(index.shape[1]):
            if index[b, t] >= 0:
                assert last.status[b, index[b, t]] == KEPT and last.token_of_patch[b, index[b, t]] == t
    assert sorted(index[index >= 0].tolist()) == sorted((last.status == KEPT).nonzero()[:, 1].tolist())


def test_unpatched_model_uses_every_token() -> None:
    model = _model(layers=())
    images, targets, patch_labels = _batch()
    loss = token_labeling_loss(model, images, targets, patch_targets=patch_labels, dense_weight=1.0, cls_weight=0.0)
    with torch.no_grad():
        _, aux_logits = model.forward_dense(images)
    expected = F.cross_entropy(aux_logits.reshape(-1, CLASSES), patch_labels.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)


def test_teacher_predictions_are_the_token_labels() -> None:
    student, teacher = _model(), _model(seed=5, layers=())
    images, targets, _ = _batch()
    loss = token_labeling_loss(student, images, targets, teacher)
    with torch.no_grad():
        soft_labels = teacher.forward_dense(images)[1].softmax(dim=-1)
    assert soft_labels.shape == (3, PATCHES, CLASSES)
    torch.testing.assert_close(loss, token_labeling_loss(student, images, targets, patch_targets=soft_labels),
                               rtol=0, atol=1e-12)
    assert teacher.return_dense is False and student.return_dense is False


def test_a_patched_teacher_is_refused() -> None:
    images, targets, _ = _batch()
    with pytest.raises(ValueError, match="teacher"):
        token_labeling_loss(_model(), images, targets, _model(seed=5))
    with pytest.raises(ValueError, match="exactly one"):
        token_labeling_loss(_model(), images, targets)


def test_gradients_reach_both_heads_and_soft_class_targets_work() -> None:
    model = _model()
    images, targets, patch_labels = _batch()
    soft = F.one_hot(targets, CLASSES).double() * 0.8 + 0.2 / CLASSES
    loss = token_labeling_loss(model, images, soft, patch_targets=patch_labels)
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.aux_head.weight.grad.abs().sum() > 0


def test_label_map_is_pooled_onto_the_token_grid() -> None:
    label_map = torch.zeros(1, 16, 16, dtype=torch.long)
    label_map[0, :8, :4] = 3  # half of the top-left patch, nothing else
    targets = label_map_targets(label_map, (2, 2), num_classes=CLASSES)
    assert targets.shape == (1, 4, CLASSES)
    torch.testing.assert_close(targets[0, 0, 3], torch.tensor(0.5))
    torch.testing.assert_close(targets.sum(-1), torch.ones(1, 4))
    assert targets[0, 1:, 3].abs().sum() == 0
