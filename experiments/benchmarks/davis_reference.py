"""Straightforward per-frame numpy J and F, written from the DAVIS 2017 toolkit's definitions.

The independent reference that tests/test_metrics.py checks ``glus_lightning.metrics`` against and
that jf_speed.py times: one frame at a time, boundaries by zero-filled shifts with the toolkit's
border rules spelled out, dilation by OR-ing the boundary shifted to every offset of the disk.
numpy only (no scipy, skimage or OpenCV).
"""

from __future__ import annotations

import numpy as np


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """J of one frame; 1 when both masks are empty."""
    pred, target = pred.astype(bool), target.astype(bool)
    union = np.sum(pred | target)
    return 1.0 if union == 0 else float(np.sum(pred & target)) / float(union)


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """1-pixel boundary map as in the toolkit: XOR with the E, S, SE neighbours, then its border rules."""
    seg = mask.astype(bool)
    east, south, south_east = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    bmap[-1, :] = seg[-1, :] ^ east[-1, :]
    bmap[:, -1] = seg[:, -1] ^ south[:, -1]
    bmap[-1, -1] = False
    return bmap


def disk_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) of the disk x^2 + y^2 <= r^2 (skimage.morphology.disk)."""
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1) if dy * dy + dx * dx <= radius * radius]


def dilate(bmap: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by the disk, zero outside the image: OR of the map shifted to every disk offset."""
    height, width = bmap.shape
    out = np.zeros_like(bmap)
    for dy, dx in disk_offsets(radius):
        if abs(dy) >= height or abs(dx) >= width:
            continue
        out[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] |= bmap[
            max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
        ]
    return out


def tolerance(height: int, width: int, bound_th: float = 0.008) -> int:
    """Match distance in pixels: ceil(bound_th * image diagonal)."""
    return int(np.ceil(bound_th * np.linalg.norm((height, width))))


def precision_recall(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Boundary precision and recall of one frame with the toolkit's empty-boundary branches."""
    radius = tolerance(*pred.shape)
    pred_b, target_b = seg2bmap(pred), seg2bmap(target)
    n_pred, n_target = int(pred_b.sum()), int(target_b.sum())
    if n_pred == 0 and n_target == 0:
        return 1.0, 1.0
    if n_pred == 0:
        return 1.0, 0.0
    if n_target == 0:
        return 0.0, 1.0
    precision = float(np.sum(pred_b & dilate(target_b, radius))) / n_pred
    recall = float(np.sum(target_b & dilate(pred_b, radius))) / n_target
    return precision, recall


def f_measure(pred: np.ndarray, target: np.ndarray) -> float:
    """Boundary F of one frame; 0 when precision + recall is 0."""
    precision, recall = precision_recall(pred, target)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def jf_frames(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame J and F of two [T, H, W] stacks, one frame at a time."""
    j = np.array([iou(p, t) for p, t in zip(pred, target)])
    f = np.array([f_measure(p, t) for p, t in zip(pred, target)])
    return j, f


def random_blobs(rng: np.random.Generator, frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A target stack of random elliptic blobs and a prediction that jitters them ([T, H, W] bool each)."""
    ys, xs = np.mgrid[0:height, 0:width]
    target = np.zeros((frames, height, width), dtype=bool)
    pred = np.zeros_like(target)
    for t in range(frames):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(0.05, 0.3) * height + 0.5, rng.uniform(0.05, 0.3) * width + 0.5
            target[t] |= ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
            cy, cx = cy + rng.normal(0, 0.03 * height), cx + rng.normal(0, 0.03 * width)
            ry, rx = ry * rng.uniform(0.8, 1.2), rx * rng.uniform(0.8, 1.2)
            pred[t] |= ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
    return pred, target
