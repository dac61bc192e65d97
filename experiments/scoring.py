"""How the experiments score a model on whole synthetic videos: J&F overall and per expression kind, and how often the
mask lands on the wrong object.

Over (expression, frame) pairs with a non-empty target:

- wrong-object rate: the fraction where the predicted mask overlaps some other single object of the video (not in the
  expression's object set) with a higher IoU than it has with the target, that IoU being > 0. Weak masks of the right
  object count here too when they touch a neighbour;
- confusion rate: among the frames where the mask clearly picks one object (IoU >= 0.5 with the target or with
  another object), the fraction where it picked another object: the error the object-contrastive loss targets.

``J&F motion late``, ``picked motion late``, ``confusion motion late``: the motion expressions on the second half of
each video only: J&F, the share of frames where the mask clearly picks one object, and of those the share where it
picked another. With ``data.synthetic.twin_motion=settled`` the twins are still there, so only earlier frames tell
them apart: a mask over both twins picks neither, one over the wrong twin is confused.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from datamodules.records import Expression, VideoRecord
from datamodules.synthetic import JPEG_QUALITY, KINDS, expression_kind
from glus_lightning.inference.predictor import segment_video
from glus_lightning.inference.sources import record_video
from glus_lightning.metrics import JAndF
from glus_lightning.module import GLUSModule

PICKED = 0.5  # IoU at which a mask counts as clearly picking an object
HARD_START_FRAMES = 4  # hard_start: the first frames fade in ...
HARD_START_FLOOR = 0.15  # ... from this fraction of their contrast
COLUMNS = ("J&F", *(f"J&F {kind}" for kind in KINDS), "J&F motion late", "picked motion late", "confusion motion late",
           "wrong_object", "confusion")

MaskFn = Callable[[VideoRecord, Sequence[Expression]], list[np.ndarray]]  # boolean (T, H, W) per expression


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def frame_errors(record: VideoRecord, obj_ids: tuple[int, ...], pred: np.ndarray) -> np.ndarray:
    """Per frame (rows), 0 or 1: [has a target, wrong object, clearly picks an object, of those: another object]; sum
    the rows of the frames to count over."""
    others = [o for o in record.object_ids if o not in obj_ids]
    counts = np.zeros((record.num_frames, 4), dtype=np.int64)
    for i in range(record.num_frames):
        target = np.zeros_like(pred[i])
        for o in obj_ids:
            target |= record.object_mask(o, i).astype(bool)
        if not target.any():
            continue
        on_target = iou(pred[i], target)
        best_other = max((iou(pred[i], record.object_mask(o, i).astype(bool)) for o in others), default=0.0)
        picked = max(on_target, best_other) >= PICKED
        counts[i] = (1, best_other > 0 and best_other > on_target, picked, picked and best_other > on_target)
    return counts


def model_masks(module: GLUSModule) -> MaskFn:
    """The masks ``glus predict`` would write (the module's own inference settings)."""
    return lambda record, expressions: segment_video(module, record_video(record), list(expressions))


def swapped_text(masks_of: MaskFn) -> MaskFn:
    """``masks_of`` asked, for each expression, with the text of the video's next expression that names other
    objects (itself where none does), and scored against the asked expression's target: masks that follow the
    sentence lose J&F, masks that ignore it do not. A grounding check that needs no second training."""

    def swapped(record: VideoRecord, expressions: Sequence[Expression]) -> list[np.ndarray]:
        n = len(expressions)
        texts = []
        for i, expression in enumerate(expressions):
            others = (expressions[(i + k) % n] for k in range(1, n))
            texts.append(next((e.text for e in others if set(e.obj_ids) != set(expression.obj_ids)), expression.text))
        return masks_of(record, [replace(e, text=t) for e, t in zip(expressions, texts, strict=True)])

    return swapped


def hard_start(record: VideoRecord, frames: int = HARD_START_FRAMES, floor: float = HARD_START_FLOOR) -> VideoRecord:
    """A copy of ``record`` whose first ``frames`` frames fade in (frame t keeps ``floor + (1 - floor) t / frames`` of
    its contrast around its median colour; masks unchanged): the object is hardest to pick out exactly where sequential
    tracking starts, the situation keyframe self-refinement is for."""
    faded = list(record.frames)
    for t in range(min(frames, len(faded))):
        pixels = record.decode_frame(t).astype(np.float32)
        median = np.median(pixels.reshape(-1, 3), axis=0)
        pixels = median + (pixels - median) * (floor + (1 - floor) * t / frames)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=JPEG_QUALITY)
        faded[t] = buffer.getvalue()
    return replace(record, frames=faded)


def evaluate(masks_of: MaskFn, records: Iterable[VideoRecord]) -> dict[str, float]:
    """J, F, J&F overall and per expression kind, the wrong-object and the confusion rate of one set of masks."""
    overall = JAndF()
    per_kind = {kind: JAndF() for kind in KINDS}
    motion_late, late_counts = JAndF(), np.zeros(4, dtype=np.int64)
    counts = np.zeros(4, dtype=np.int64)
    seen: set[str] = set()
    for record in records:
        for expression, pred in zip(record.expressions, masks_of(record, record.expressions), strict=True):
            target = np.stack([record.expression_mask(expression, i) for i in range(record.num_frames)]).astype(bool)
            key, kind = f"{record.key}/{expression.exp_id}", expression_kind(expression.text)
            seen.add(kind)
            for metric in (overall, per_kind[kind]):
                metric.update(torch.from_numpy(pred), torch.from_numpy(target), key=key)
            errors = frame_errors(record, expression.obj_ids, pred)
            counts += errors.sum(0)
            if kind == "motion":
                mid = record.num_frames // 2
                motion_late.update(torch.from_numpy(pred[mid:]), torch.from_numpy(target[mid:]), key=key)
                late_counts += errors[mid:].sum(0)
    scores = {k: float(v) for k, v in overall.compute().items() if k in ("J", "F", "J&F")}
    for kind, metric in per_kind.items():
        scores[f"J&F {kind}"] = float(metric.compute()["J&F"]) if kind in seen else float("nan")
    scores["J&F motion late"] = float(motion_late.compute()["J&F"]) if "motion" in seen else float("nan")
    frames, wrong, picked, confused = counts.tolist()
    late_frames, _, late_picked, late_confused = late_counts.tolist()
    scores |= {"picked motion late": late_picked / max(late_frames, 1), "confusion motion late": late_confused / max(late_picked, 1)}
    return {**scores, "wrong_object": wrong / max(frames, 1), "confusion": confused / max(picked, 1)}


def mean_spread(values: Sequence[float]) -> str:
    """``mean+-std`` over seeds (population std, as numpy's default)."""
    array = np.asarray(values, dtype=np.float64)
    return f"{np.nanmean(array):.3f}+-{np.nanstd(array):.3f}"
