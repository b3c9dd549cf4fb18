"""Validation: this rank's share of the exact DACON score, summed for one all-reduce."""
from __future__ import annotations

import torch
import torch.nn as nn

from job.step import batch_to_device
from restore.score import score_image, score_sums


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, autocast_dtype, channels_last: bool) -> list[float]:
    """This rank's ``score_sums`` of the exact DACON score over its share of the validation split."""
    was_training = model.training
    model.eval()
    per_image = []
    for batch in loader:
        b = batch_to_device(batch, device, channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            _, rgb = model(b["input"], b["mask"])
        pred = (rgb.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        gt, mask = batch["gt"].numpy(), batch["mask"].numpy()[:, 0] > 0
        per_image.extend(score_image(gt[i], pred[i], mask[i]) for i in range(len(pred)))
    model.train(was_training)
    return score_sums(per_image)
