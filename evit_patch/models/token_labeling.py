"""Token labeling (LV-ViT) on the tokens that survive EViT.

LV-ViT trains its ``aux_head`` with one label per image patch. After EViT, a kept token
is still exactly one input patch, so it keeps that patch's label; the fused token mixes
many patches and carries none; dropped patches (EViT without fusion) are gone. Which
patch each surviving token is comes from the provenance the patch records
(:func:`evit_patch.kept_tokens`), so the loss needs nothing from the model beyond its
``(cls_logits, aux_logits)``.

Per-patch targets come from a label map (:func:`label_map_targets`) or, when no offline
label maps exist, from a teacher's per-token predictions (:func:`teacher_token_targets`):
an unpatched LV-ViT sees every patch of the same (possibly mixed) images.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from timm.utils import unwrap_model
from torch import Tensor, nn

from evit_patch.core.lifecycle import is_patched
from evit_patch.core.provenance import KEPT, kept_tokens
from evit_patch.losses import classification_loss


@contextlib.contextmanager
def dense_outputs(model: nn.Module) -> Iterator[None]:
    """Make ``model(images)`` return ``(cls_logits, aux_logits)`` for a while. Calling the
    model itself (not a method of it) keeps a DistributedDataParallel wrapper in the loop."""
    network = unwrap_model(model)
    if not hasattr(network, "return_dense"):
        raise TypeError(f"{type(network).__name__} has no token-labeling head (return_dense); use an LV-ViT")
    previous = network.return_dense
    network.return_dense = True
    try:
        yield
    finally:
        network.return_dense = previous


def surviving_patch_index(model: nn.Module, tokens: Tensor) -> Tensor:
    """``(B, T)``: for each image token of the model's last forward, the input patch it
    is, or -1 for a fused token. ``tokens`` is ``(B, T, ...)``, e.g. the aux logits."""
    batch, count = tokens.shape[:2]
    network = unwrap_model(model)
    if not is_patched(network):
        return torch.arange(count, device=tokens.device).expand(batch, count)
    last = kept_tokens(network)[-1]
    if last.token_of_patch.shape[0] != batch or int(last.token_of_patch.max()) >= count:
        raise ValueError("tokens do not come from the model's last forward; score them right after it")
    patches = last.status.shape[1]
    # each kept patch is its own token; every other patch is sent to a spare column, then cut off
    destination = torch.where(last.status == KEPT, last.token_of_patch, count)
    owner = torch.full((batch, count + 1), -1, dtype=torch.long, device=tokens.device)
    owner.scatter_(1, destination, torch.arange(patches, device=tokens.device).expand(batch, patches))
    return owner[:, :count]


def label_map_targets(label_map: Tensor, grid_size: tuple[int, int], num_classes: int) -> Tensor:
    """Per-patch soft targets ``(B, P, K)`` from a dense label map: class indices
    ``(B, H, W)`` (the share of each class in a patch) or class scores ``(B, K, H, W)``
    (averaged over a patch), at any resolution that the token grid divides."""
    if label_map.dtype in (torch.int64, torch.int32, torch.uint8):
        label_map = F.one_hot(label_map.long(), num_classes).permute(0, 3, 1, 2).float()
    if label_map.dim() != 4 or label_map.shape[1] != num_classes:
        raise ValueError(f"label_map must be (B, H, W) class indices or (B, {num_classes}, H, W) scores, "
                         f"got {tuple(label_map.shape)}")
    return F.adaptive_avg_pool2d(label_map, grid_size).flatten(2).transpose(1, 2)


@torch.no_grad()
def teacher_token_targets(teacher: nn.Module, images: Tensor) -> Tensor:
    """Per-patch soft targets ``(B, P, K)``: the teacher's aux-head probabilities. The
    teacher must be unpatched, so that it gives one prediction per input patch."""
    if is_patched(unwrap_model(teacher)):
        raise ValueError("the teacher is EViT-patched; it must see every patch: use an unpatched model "
                         "(evit_patch.remove_evit(teacher))")
    with dense_outputs(teacher):
        _, aux_logits = teacher(images)
    return aux_logits.softmax(dim=-1)


def kept_token_loss(aux_logits: Tensor, patch_targets: Tensor, patch_index: Tensor) -> Tensor:
    """Mean cross-entropy of the tokens that are one input patch (``patch_index >= 0``)
    against that patch's target: class indices ``(B, P)`` or soft ``(B, P, K)``."""
    kept = patch_index >= 0
    index = patch_index.clamp(min=0)
    if patch_targets.dim() == 2:
        per_token = F.cross_entropy(aux_logits.transpose(1, 2), patch_targets.gather(1, index), reduction="none")
    else:
        soft = patch_targets.gather(1, index.unsqueeze(-1).expand(-1, -1, patch_targets.shape[-1]))
        per_token = torch.sum(-soft * aux_logits.log_softmax(dim=-1), dim=-1)
    return (per_token * kept).sum() / kept.sum().clamp(min=1)


def token_labeling_loss(model: nn.Module, images: Tensor, targets: Tensor, teacher: Optional[nn.Module] = None,
                        *, patch_targets: Optional[Tensor] = None, dense_weight: float = 0.5,
                        cls_weight: float = 1.0) -> Tensor:
    """``cls_weight * CE(cls, targets) + dense_weight * CE(kept tokens, their patches' labels)``.

    Runs the forward itself (so the provenance it reads is this forward's). Per-patch
    targets come from ``patch_targets`` (``(B, P)`` indices or ``(B, P, K)``, e.g. from
    :func:`label_map_targets`) or from ``teacher``; give exactly one. ``model`` may be
    patched or not, and wrapped in DistributedDataParallel.
    """
    if (teacher is None) == (patch_targets is None):
        raise ValueError("pass exactly one source of token labels: a teacher or patch_targets")
    with dense_outputs(model):
        cls_logits, aux_logits = model(images)
    if teacher is not None:
        patch_targets = teacher_token_targets(teacher, images)
    network = unwrap_model(model)
    num_patches = kept_tokens(network)[-1].status.shape[1] if is_patched(network) else aux_logits.shape[1]
    if patch_targets.shape[:2] != (images.shape[0], num_patches):
        raise ValueError(f"token labels must cover all {num_patches} patches of each image, "
                         f"got shape {tuple(patch_targets.shape)}")
    index = surviving_patch_index(model, aux_logits)
    return (cls_weight * classification_loss(cls_logits, targets)
            + dense_weight * kept_token_loss(aux_logits, patch_targets, index))
