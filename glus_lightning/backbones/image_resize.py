"""The vision tower's input square from a frame the data pipeline already squashed to S x S (``backbone.image_resize``).

- ``squash``: the whole frame, resized to the tower's size (aspect ratio not kept).
- ``center_crop``: the centre square of the *original* frame, as CLIPImageProcessor takes it (short side to the
  tower's size, then the centre crop) and the GLUS reference trained on. The loader squashed a W x H original
  (W > H) to S x S, so that square is the band of columns ``[S (W - H) / 2W, S (W + H) / 2W)`` (rows for H > W),
  which is cut out and resized to the tower's size. The pixels are resampled twice (original -> S, band ->
  tower size) instead of once: with S = 1024 and a 224 px tower both are downsamplings, and the result differs from
  the processor's by resampling rounding only (``tests/test_reference_inputs.py`` measures it).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from glus_lightning.config import ConfigError

RESIZES = ("squash", "center_crop")


def check_image_resize(value: str) -> str:
    if value not in RESIZES:
        raise ConfigError(f"backbone.image_resize={value!r} is not a resize; valid: {', '.join(RESIZES)}")
    return value


def centre_square(side: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, left, rows, cols)`` of an ``height x width`` frame's centre square inside that frame squashed to
    ``side x side`` (whole pixels, centred)."""
    if height < 1 or width < 1:
        raise ValueError(f"a frame's original size must be positive, got {height} x {width}")
    if width >= height:
        left = round(side * (width - height) / (2 * width))
        return 0, left, side, side - 2 * left
    top = round(side * (height - width) / (2 * height))
    return top, 0, side - 2 * top, side


def tower_input(frames: Tensor, size: int, resize: str, original_sizes: list[tuple[int, int]] | None) -> Tensor:
    """float [N, 3, size, size] in [0, 1] from uint8 ``frames`` [N, 3, S, S]; ``original_sizes``: each frame's
    ``(H, W)`` before the squash, which ``center_crop`` needs."""
    x = frames.float() / 255
    if resize == "squash":
        return _resized(x, size)
    if original_sizes is None or len(original_sizes) != len(frames):
        got = None if original_sizes is None else len(original_sizes)
        raise ValueError(
            f"backbone.image_resize=center_crop needs each frame's original (H, W) ({len(frames)} frames, got {got}): "
            "pass the batch's video_sizes"
        )
    if frames.shape[-2] != frames.shape[-1]:
        raise ValueError(f"center_crop takes squashed square frames, got {tuple(frames.shape[-2:])}")
    original_sizes = [(int(h), int(w)) for h, w in original_sizes]
    side = frames.shape[-1]
    out = x.new_empty(len(frames), x.shape[1], size, size)
    for hw in set(original_sizes):  # one resize per distinct original size (one per video)
        rows = [i for i, s in enumerate(original_sizes) if s == hw]
        top, left, h, w = centre_square(side, *hw)
        out[rows] = _resized(x[rows, :, top : top + h, left : left + w], size)
    return out


def _resized(x: Tensor, size: int) -> Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
