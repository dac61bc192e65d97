"""The GLUS training objective (``GLUSLoss``) and its mask terms, each averaged over (expression, frame) masks at the
target's own resolution."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.batch import RefVOSBatch
from glus_lightning.config import LossConfig
from glus_lightning.heads.contrastive_keys import row_keys
from glus_lightning.heads.object_contrastive import ObjectContrastiveHead
from glus_lightning.masks import masks_from_logits, upsample_logits
from glus_lightning.metrics import mask_iou


@dataclass
class GLUSOutput:
    """The training forward's output (``GLUSModule.forward``), what ``GLUSLoss`` scores."""

    lm_loss: Tensor  # scalar
    mask_logits: Tensor  # [E, Q, h, w] low-resolution logits
    prompts: Tensor  # [E, Q, prompt_dim] projected [SEG] embeddings
    iou_pred: Tensor  # [E, Q] SAM2's predicted IoU
    object_logits: Tensor  # [E, Q] SAM2's object-presence logits


class GLUSLoss:
    """CE at the ``[SEG]`` targets + BCE + Dice (GLUS weights 1 : 2 : 0.5), SAM2's object-presence and IoU heads, and
    the object-contrastive InfoNCE when ``contrastive`` is given, weighted by ``loss.*``.

    Returns the weighted sum and every unweighted term by name (``ce``, ``bce``, ``dice``, ``object``, ``iou_pred``,
    ``contrastive``), the names ``train/<term>`` is logged under.
    """

    def __init__(self, weights: LossConfig, mask_threshold: float, contrastive: ObjectContrastiveHead | None = None) -> None:
        self.weights = {"ce": weights.ce_weight, "bce": weights.bce_weight, "dice": weights.dice_weight,
                        "object": weights.object_weight, "iou_pred": weights.iou_weight,
                        "contrastive": weights.contrastive_weight}
        self.mask_threshold = mask_threshold
        self.contrastive = contrastive

    def __call__(self, out: GLUSOutput, batch: RefVOSBatch) -> tuple[Tensor, dict[str, Tensor]]:
        bce, dice = mask_losses(out.mask_logits, batch.masks)
        terms = {
            "ce": out.lm_loss,
            "bce": bce,
            "dice": dice,
            "object": presence_loss(out.object_logits, batch.masks),
            "iou_pred": iou_prediction_loss(out.iou_pred, out.mask_logits, batch.masks, self.mask_threshold),
        }
        if self.contrastive is not None:
            terms["contrastive"] = self.contrastive(out.prompts, row_keys(batch))
        total = sum(self.weights[name] * term for name, term in terms.items())
        return total, terms


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


def presence_loss(object_logits: Tensor, targets: list[Tensor]) -> Tensor:
    """BCE of SAM2's object-score logits ``[E, Q]`` against "the target is non-empty in this frame"."""
    present = torch.stack([t.flatten(1).any(1) for t in targets]).to(object_logits.dtype)
    return F.binary_cross_entropy_with_logits(object_logits, present)


def iou_prediction_loss(iou_pred: Tensor, logits: list[Tensor], targets: list[Tensor], threshold: float) -> Tensor:
    """L1 between SAM2's predicted IoU ``[E, Q]`` and the IoU its thresholded mask achieves (as SAM2 trains it)."""
    achieved = []
    for lg, tgt in zip(logits, targets, strict=True):
        pred = masks_from_logits(lg.detach(), tuple(tgt.shape[-2:]), threshold)
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
