"""DeiT-style distillation (``DistillationLoss``) against the formula written out here.

soft: ``(1 - alpha) CE(cls, y) + alpha tau^2 KL(softmax(teacher / tau) || softmax(dist / tau))``
(KL summed over classes, averaged over the batch); hard: ``(1 - alpha) CE(cls, y) +
alpha CE(dist, argmax teacher)``. ``y`` is a label (with label smoothing) or, with mixup,
a distribution over classes. A student without a distillation head uses its one output
for both terms. tau and alpha are chosen away from 1 and 0.5, and the two heads differ,
so that a missing tau^2, a swapped alpha or KL, an undivided teacher or the wrong head
each changes the loss.
"""

import math

import pytest
import torch
from torch import Tensor, nn

from evit_patch.train.criterion import DistillationLoss
from evit_patch.train.recipe import DataConfig, TeacherConfig

CLASSES = 7
TAU = 3.0
ALPHA = 0.3


def _log_softmax(logits: Tensor) -> Tensor:
    shifted = logits - logits.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of ``-sum_c target_c log softmax(logits)_c``."""
    return -(target * _log_softmax(logits)).sum(dim=1).mean()


def _one_hot(labels: Tensor, smoothing: float = 0.0) -> Tensor:
    """Labels as distributions, with smoothing spread over all classes (as PyTorch and timm do)."""
    target = torch.full((labels.shape[0], CLASSES), smoothing / CLASSES, dtype=torch.float64)
    target[torch.arange(labels.shape[0]), labels] += 1.0 - smoothing
    return target


def _kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """``KL(softmax(p) || softmax(q))`` per sample, averaged over the batch."""
    log_p, log_q = _log_softmax(p_logits), _log_softmax(q_logits)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def expected_loss(cls: Tensor, dist: Tensor, teacher: Tensor, target: Tensor, kind: str) -> Tensor:
    base = _cross_entropy(cls, target)
    if kind == "soft":
        distill = TAU * TAU * _kl(teacher / TAU, dist / TAU)
    else:
        distill = _cross_entropy(dist, _one_hot(teacher.argmax(dim=1)))
    return (1 - ALPHA) * base + ALPHA * distill


class Teacher(nn.Module):
    """A linear classifier of the flattened images, with parameters that must stay out of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 4 * 4, CLASSES).double()
        with torch.no_grad():
            self.linear.weight.mul_(5.0)  # logits far from uniform: tau matters

    def forward(self, images: Tensor) -> Tensor:
        return self.linear(images.flatten(1))


@torch.no_grad()
def _assert_wrong_formulas_differ(teacher: Tensor, cls: Tensor, dist: Tensor, labels: Tensor) -> None:
    """The batch tells apart the wrong formulas the comparisons are meant to catch."""
    target = _one_hot(labels)
    right = float(expected_loss(cls, dist, teacher, target, "soft"))
    base, kl = float(_cross_entropy(cls, target)), float(_kl(teacher / TAU, dist / TAU))
    wrong = {
        "tau^2 missing": (1 - ALPHA) * base + ALPHA * kl,
        "KL swapped": (1 - ALPHA) * base + ALPHA * TAU ** 2 * float(_kl(dist / TAU, teacher / TAU)),
        "alpha swapped": ALPHA * base + (1 - ALPHA) * TAU ** 2 * kl,
        "teacher not divided by tau": (1 - ALPHA) * base + ALPHA * TAU ** 2 * float(_kl(teacher, dist / TAU)),
        "class head distilled": float(expected_loss(cls, cls, teacher, target, "soft")),
    }
    for name, value in wrong.items():
        assert not math.isclose(value, right, rel_tol=1e-3), name
    hard = float(expected_loss(cls, dist, teacher, target, "hard"))
    assert not math.isclose(hard, float(expected_loss(cls, cls, teacher, target, "hard")), rel_tol=1e-3)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, 4, 4, generator=generator, dtype=torch.float64)
    cls = (3 * torch.randn(5, CLASSES, generator=generator, dtype=torch.float64)).requires_grad_()
    dist = (3 * torch.randn(5, CLASSES, generator=generator, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, CLASSES, (5,), generator=generator)
    mixed = torch.rand(5, CLASSES, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    teacher = Teacher()
    with torch.no_grad():
        _assert_wrong_formulas_differ(teacher(images), cls, dist, labels)
    return images, cls, dist, labels, mixed / mixed.sum(dim=1, keepdim=True), teacher


@pytest.mark.parametrize("kind", ["soft", "hard"])
@pytest.mark.parametrize("targets", ["labels", "smoothed-labels", "mixup"])
@pytest.mark.parametrize("student", ["distilled", "plain"])
def test_distillation_loss_and_its_gradients_follow_the_formula(batch, kind, targets, student):
    images, cls, dist, labels, mixed, teacher = batch
    smoothing = 0.1 if targets == "smoothed-labels" else 0.0
    data = DataConfig(mixup=0.8 if targets == "mixup" else 0.0, label_smoothing=smoothing)
    criterion = DistillationLoss(data, teacher, TeacherConfig(name="teacher", kind=kind, alpha=ALPHA, tau=TAU))
    target = mixed if targets == "mixup" else labels
    outputs = (cls, dist) if student == "distilled" else cls

    loss = criterion(images, outputs, target)
    with torch.no_grad():
        teacher_logits = teacher(images)
    distill_head = dist if student == "distilled" else cls
    dense_target = mixed if targets == "mixup" else _one_hot(labels, smoothing)
    expected = expected_loss(cls, distill_head, teacher_logits, dense_target, kind)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)

    inputs = [cls, dist] if student == "distilled" else [cls]
    for got, want in zip(torch.autograd.grad(loss, inputs, retain_graph=True), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    loss.backward()
    assert all(parameter.grad is None for parameter in teacher.parameters())  # the teacher is not trained


@pytest.mark.parametrize("targets", ["labels", "mixup"])
def test_without_a_teacher_the_loss_is_the_cross_entropy_of_the_class_head(batch, targets):
    images, cls, dist, labels, mixed, _ = batch
    criterion = DistillationLoss(DataConfig(mixup=0.8 if targets == "mixup" else 0.0), None, None)
    target = mixed if targets == "mixup" else labels
    expected = _cross_entropy(cls, mixed if targets == "mixup" else _one_hot(labels))
    torch.testing.assert_close(criterion(images, (cls, dist), target), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(criterion(images, cls, target), expected, rtol=1e-12, atol=1e-12)

