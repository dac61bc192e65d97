"""Mask losses against direct element-wise computations."""

from __future__ import annotations

import math

import pytest
import torch

from glus_lightning.losses import iou_prediction_loss, mask_bce, mask_dice, mask_losses, presence_loss


def _bce_by_hand(logit: float, target: float) -> float:
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_bce_matches_elementwise_formula() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.5, 0.0]]])
    target = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.uint8)
    expected = sum(_bce_by_hand(lg, t) for lg, t in zip(logits.flatten().tolist(), target.flatten().tolist())) / 4
    assert torch.allclose(mask_bce(logits, target), torch.tensor([expected]), atol=1e-6)


def test_dice_matches_formula_and_empty_convention() -> None:
    logits = torch.tensor([[[3.0, -3.0], [0.0, 1.0]]])
    target = torch.tensor([[[1, 0], [1, 0]]])
    p = torch.sigmoid(logits).flatten()
    t = target.flatten().float()
    expected = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    assert torch.allclose(mask_dice(logits, target), expected[None], atol=1e-6)
    # a confidently empty prediction of an empty target costs (almost) nothing; a wrong one costs a lot
    empty = torch.zeros(1, 4, 4)
    assert mask_dice(torch.full((1, 4, 4), -20.0), empty).item() < 1e-6
    assert mask_dice(torch.full((1, 4, 4), 20.0), empty).item() > 0.9


def test_mask_losses_average_every_mask_at_target_resolution() -> None:
    torch.manual_seed(0)
    # two expressions of videos with different sizes: Q=3 low-res logits each
    logits = [torch.randn(3, 4, 4), torch.randn(3, 4, 4)]
    targets = [torch.randint(0, 2, (3, 8, 8), dtype=torch.uint8), torch.randint(0, 2, (3, 4, 6), dtype=torch.uint8)]
    bce, dice = mask_losses(logits, targets)
    per_mask_bce, per_mask_dice = [], []
    for lg, tgt in zip(logits, targets):
        up = torch.nn.functional.interpolate(lg[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        for f in range(3):
            per_mask_bce.append(torch.nn.functional.binary_cross_entropy_with_logits(up[f], tgt[f].float()))
            per_mask_dice.append(mask_dice(up[f][None], tgt[f][None])[0])
    assert torch.allclose(bce, torch.stack(per_mask_bce).mean(), atol=1e-6)
    assert torch.allclose(dice, torch.stack(per_mask_dice).mean(), atol=1e-6)


def test_presence_loss_targets_non_empty_frames() -> None:
    targets = [torch.tensor([[[0, 0], [0, 0]], [[0, 1], [0, 0]]], dtype=torch.uint8)]  # frame 0 empty, frame 1 not
    logits = torch.tensor([[-2.0, 3.0]])
    expected = (_bce_by_hand(-2.0, 0.0) + _bce_by_hand(3.0, 1.0)) / 2
    assert presence_loss(logits, targets).item() == pytest.approx(expected, abs=1e-6)


def test_iou_prediction_loss_is_l1_to_the_achieved_iou() -> None:
    # one expression, two frames: the thresholded prediction covers 2 of 4 pixels, target 1 of them -> IoU 0.5;
    # the second frame: both empty -> IoU 1
    logits = [torch.tensor([[[5.0, 5.0], [-5.0, -5.0]], [[-5.0, -5.0], [-5.0, -5.0]]])]
    targets = [torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.uint8)]
    iou_pred = torch.tensor([[0.7, 0.4]])
    expected = (abs(0.7 - 0.5) + abs(0.4 - 1.0)) / 2
    assert iou_prediction_loss(iou_pred, logits, targets, threshold=0.0).item() == pytest.approx(expected, abs=1e-6)
