"""Mask losses of GLUS, each averaged over (expression, frame) masks at the mask's own resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from glus_lightning.metrics import mask_iou


def mask_bce(logits: Tensor, target: Tensor) -> Tensor:
    """Per-mask mean binary cross-entropy. ``logits``, ``target``: ``[N, H, W]``; returns ``[N]``."""
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none").flatten(1).mean(1)


def mask_dice(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Per-mask soft Dice loss ``1 - (2|P*T| + s) / (|P| + |T| + s)``; returns ``[N]``.

    The smoothing term makes an empty target with an empty prediction cost nothing.
    """
    prob = logits.sigmoid().flatten(1)
    tgt = target.to(prob.dtype).flatten(1)
    return 1.0 - (2.0 * (prob * tgt).sum(1) + smooth) / (prob.sum(1) + tgt.sum(1) + smooth)


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``[N, h, w]`` mask logits to ``size`` (the video's original resolution)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def presence_loss(object_logits: Tensor, targets: list[Tensor]) -> Tensor:
    """BCE of SAM2's object-score logits ``[E, Q]`` against "the target is non-empty in this frame"."""
    present = torch.stack([t.flatten(1).any(1) for t in targets]).to(object_logits.dtype)
    return F.binary_cross_entropy_with_logits(object_logits, present)


def iou_prediction_loss(iou_pred: Tensor, logits: list[Tensor], targets: list[Tensor], threshold: float) -> Tensor:
    """L1 between SAM2's predicted IoU ``[E, Q]`` and the IoU its thresholded mask achieves (as SAM2 trains it)."""
    achieved = []
    for lg, tgt in zip(logits, targets, strict=True):
        pred = upsample_logits(lg.detach().float(), tuple(tgt.shape[-2:])) > threshold
        achieved.append(mask_iou(pred, tgt.bool()))
    return F.l1_loss(iou_pred.float(), torch.stack(achieved).to(iou_pred.device, torch.float32))


def mask_losses(logits: list[Tensor], targets: list[Tensor]) -> tuple[Tensor, Tensor]:
    """BCE and Dice averaged over every (expression, frame) mask.

    ``logits[e]``: low-resolution ``[Q, h, w]``; ``targets[e]``: ``[Q, H_e, W_e]`` in {0, 1}. Each expression's
    logits are upsampled to its target's size, so videos of different sizes mix in one batch.
    """
    bce, dice = [], []
    for lg, tgt in zip(logits, targets, strict=True):
        full = upsample_logits(lg.float(), tuple(tgt.shape[-2:]))
        bce.append(mask_bce(full, tgt))
        dice.append(mask_dice(full, tgt))
    return torch.cat(bce).mean(), torch.cat(dice).mean()
