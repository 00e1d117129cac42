"""Top-1/top-5 accuracy over an evaluation split, under the run's mixed precision."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader

from evit_patch.train.distributed import Runtime, sum_across
from evit_patch.train.transformers_source import logits_of

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The recipe's ``train.amp`` as an autocast context (none: full precision)."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, runtime: Runtime, amp: str = "none") -> dict[str, float]:
    """Top-1 and top-5 in percent over the loader (summed over all processes)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    for images, labels in loader:
        images, labels = images.to(runtime.device), labels.to(runtime.device)
        with autocast(runtime.device, amp):
            logits = logits_of(model(images))
        top = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == labels.unsqueeze(-1)
        counts += torch.tensor([hits[:, 0].sum().item(), hits.any(-1).sum().item(), labels.numel()], dtype=torch.float64)
    model.train(was_training)
    top1, top5, total = sum_across(counts, runtime).tolist()
    return {"top1": 100.0 * top1 / max(total, 1), "top5": 100.0 * top5 / max(total, 1)}
