"""ReVOS scores for ``glus evaluate --protocol revos``: A and R beside J and F, and the means per expression type.

ReVOS (VISA, ECCV 2024) ships MeViS-style ground truth: ``mask_dict.json`` (anno_id -> COCO RLE or null per frame),
``meta_expressions_valid_.json`` whose expressions also carry ``type_id`` (0 referring, 1 reasoning, 2 other) and
``mask_dict_foreground.json`` (video -> ``{"masks_rle": [RLE per frame]}``: every annotated object of the video).
:mod:`glus_lightning.evaluation` reads the targets as MeViS ones (union of the expression's objects) and calls this
module for the rest: the expression types, each video's foreground, A and R.
Per expression, over all its frames, as VISA's ``tools/eval_revos.py`` and ``tools/metrics.py`` score it:

- J and F: the DAVIS per-frame scores (:mod:`glus_lightning.metrics`), averaged over the frames;
- A: the share of pixels where prediction and target agree, averaged over the frames;
- R (robustness): per frame ``max(1 - FP / (foreground pixels + 1e-6), 0)`` with FP the predicted pixels outside the
  target, averaged over the frames. The foreground is ``--foreground`` or, without it, the union of the objects of
  all expressions of the video in the metadata, as ReVOS's ``tools/generate_foreground_mask.py`` makes the file (the
  two agree when the file is ReVOS's own). The file is checked: one RLE per frame, of the size of the video's masks,
  holding every annotated pixel of the video (the official script reads it unchecked).

The referring and the reasoning expressions are averaged apart (J&F = (J + F) / 2 of each); overall is the mean of
those two rows, not the mean over all expressions; type 2 is in neither (only in its video's row, which is a
``glus evaluate`` addition). A type without expressions is NaN, and so is overall, as in the official script.

Where the official script reads otherwise, and what is done here:

- It reads each PNG's raw grayscale value (OpenCV). J and F binarise it, A and R do not: a 0/255 PNG has every
  object pixel counted wrong in A (255 is not 1) and every false positive counted 255 times in R, and a palette PNG
  is scored by the gray level of its colours. Here every prediction is binary (nonzero = object), so A and R equal
  the official ones for 0/1 PNGs, and a 0/255 PNG (what VISA's own inference writes) scores as its 0/1 twin, where
  the official script under-scores it.
- It adds up the expression's objects as uint8, so where two of them overlap the target is 2: J and F see the union,
  but A counts such a pixel wrong whatever is predicted, and R (``1 - 2`` wraps to 255) counts a correctly predicted
  one as 255 false positives. Here the target is the binary union in all four scores: the same numbers wherever
  an expression's objects do not overlap, higher A and R where they do.
- A video without a prediction folder scores 0 in all four there and here, and so does an expression without any
  PNG (there the script fails on its first frame and its catch-all scores 0). An expression missing only some PNGs
  fails the same way there (0 in all four); here those frames are empty masks and listed, as for every protocol, so
  such an expression can score higher here. A prediction of the wrong size is 0 there, an error here.
- It rounds each expression's percentages to 2 decimals before averaging; here nothing is rounded (< 0.005 points).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.formats import check_rle, expression_items, load_json, meta_videos
from datamodules.records import decode_rle
from glus_lightning.evaluation_errors import EvaluationError

TYPE_NAMES = {0: "referring", 1: "reasoning", 2: "other"}  # ``type_id`` of an expression
AGGREGATED = ("referring", "reasoning")  # the types averaged apart; overall is the mean of their means
ROBUSTNESS_EPS = 1e-6  # added to the foreground's pixel count, as the official script does

# (video, frame count, frame shape, the video's decoded objects: anno_id -> [T, H, W]) -> foreground [T, H, W]
Foreground = Callable[[str, int, tuple[int, int], dict[str, np.ndarray]], np.ndarray]


def expression_types(meta: Path) -> dict[str, str]:
    """``"<video>/<exp_id>"`` -> referring, reasoning or other, from each expression's ``type_id``."""
    types = {}
    for video, entry in meta_videos(meta).items():
        for exp_id, exp in expression_items(entry, f"{meta}: video {video!r}"):
            type_id = exp.get("type_id")
            if not isinstance(type_id, int) or isinstance(type_id, bool) or type_id not in TYPE_NAMES:
                raise EvaluationError(
                    f"{meta}: video {video!r} expression {exp_id}: protocol revos needs 'type_id' 0 (referring), "
                    f"1 (reasoning) or 2 (other), got {type_id!r}"
                )
            types[f"{video}/{exp_id}"] = TYPE_NAMES[type_id]
    return types


def union_foreground(video: str, num_frames: int, shape: tuple[int, int], objects: dict[str, np.ndarray]) -> np.ndarray:
    """The video's foreground ``[T, H, W]``: the union of all its objects (of every expression, type 2 included)."""
    union = np.zeros((num_frames, *shape), dtype=bool)
    for masks in objects.values():
        union |= masks
    return union


def foreground_reader(path: Path | None, mask_dict: Path) -> Foreground:
    """:func:`union_foreground`, or with ``path`` a reader of ``mask_dict_foreground.json`` checked against the ground truth."""
    if path is None:
        return union_foreground
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"--foreground {path}: file not found")
    videos = load_json(path)
    if not isinstance(videos, dict):
        raise EvaluationError(
            f"{path}: expected an object {{video: {{'masks_rle': [RLE per frame]}}}}, got {type(videos).__name__}"
        )

    def read(video: str, num_frames: int, shape: tuple[int, int], objects: dict[str, np.ndarray]) -> np.ndarray:
        where = f"{path}: video {video!r}"
        entry = videos.get(video)
        per_frame: Any = entry.get("masks_rle") if isinstance(entry, dict) else None
        if not isinstance(per_frame, list) or len(per_frame) != num_frames:
            got = "no entry" if entry is None else f"{len(per_frame)} entries" if isinstance(per_frame, list) else str(entry)[:60]
            raise EvaluationError(f"{where}: 'masks_rle' must be a list of {num_frames} RLEs (one per frame), got {got}")
        union = union_foreground(video, num_frames, shape, objects)
        if not union.any():  # no annotated pixel: the frame size is not known from mask_dict.json, the foreground is empty
            return union
        masks = np.zeros_like(union)
        for t, rle in enumerate(per_frame):
            if rle is None:
                continue
            if not isinstance(rle, dict) or rle.get("size") != list(shape):
                size = rle.get("size") if isinstance(rle, dict) else str(rle)[:40]
                raise EvaluationError(
                    f"{where} frame {t}: foreground RLE of size {size}, the video's masks are {list(shape)} (height, width)"
                )
            check_rle(rle, shape[0], shape[1], f"{where} frame {t}")
            masks[t] = decode_rle(rle, f"{where} frame {t}") != 0
        outside = np.flatnonzero((union & ~masks).any(axis=(1, 2)))
        if outside.size:
            raise EvaluationError(
                f"{where}: the foreground leaves out annotated pixels of the video in {outside.size} frame(s) (first: "
                f"frame {outside[0]}), so it is not the union of the objects of {mask_dict}; leave out --foreground to compute it"
            )
        return masks

    return read


def pixel_scores(pred: np.ndarray, target: np.ndarray, foreground: np.ndarray) -> dict[str, float]:
    """A and R of one expression: boolean masks ``[T, H, W]`` (prediction, target, video foreground), frame means."""
    frames, pixels = pred.shape[0], pred.shape[1] * pred.shape[2]
    pred, target, foreground = (m.reshape(frames, pixels) for m in (pred, target, foreground))
    accuracy = np.count_nonzero(pred == target, axis=1) / pixels
    false_positives = np.count_nonzero(pred & ~target, axis=1)
    robustness = np.maximum(1 - false_positives / (np.count_nonzero(foreground, axis=1) + ROBUSTNESS_EPS), 0.0)
    return {"A": float(accuracy.mean()), "R": float(robustness.mean())}
