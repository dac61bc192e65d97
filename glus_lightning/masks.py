"""Low-resolution mask logits -> masks at a video's own size: upsample, then threshold (one way, used everywhere)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``[N, h, w]`` mask logits to ``size`` (the video's original resolution)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def masks_from_logits(logits: Tensor, size: tuple[int, int], threshold: float) -> Tensor:
    """Boolean masks ``[N, *size]`` from mask logits ``[N, h, w]``: upsampled in fp32 (bf16 logits lose the
    threshold's precision), then ``> threshold`` (``mask_threshold``: 0.0 is probability 0.5)."""
    return upsample_logits(logits.float(), tuple(size)) > threshold
