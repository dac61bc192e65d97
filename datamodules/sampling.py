"""GLUS frame and expression sampling, and turning one stored video into one model sample.

Choosing frames (a ``SamplePlan``) is separate from decoding them, so a plan is cheap: the
DataModule plans (and rejects unusable videos) before its shuffle buffer and decodes after it.
Functions here are pure; randomness comes from the ``random.Random`` passed in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.records import Expression, RecordError, VideoRecord
from datamodules.targets import DenseTargets, ObjectTargets, Targets


@dataclass(frozen=True)
class SamplePlan:
    """Which frames and expressions of a video make one sample; query masks are the targets."""

    context: list[int]
    query: list[int]
    expressions: list[Expression]


@dataclass
class VideoSample:
    """One video's model input: what the collate step stacks into a ``RefVOSBatch``."""

    dataset: str
    video: str
    object_ids: tuple[int, ...]
    plan: SamplePlan
    query_frame_names: list[str]
    frames: Tensor  # uint8 [C + Q, 3, S, S], context first
    targets: Targets  # per expression, uint8 {0,1} [Q, H, W] at the video's resolution: dense, or per-object RLE


def segments(num_frames: int, num_segments: int) -> list[range]:
    """Split ``range(num_frames)`` into ``num_segments`` near-equal consecutive parts.

    With fewer frames than segments a part holds one frame and frames repeat across parts; no segments: no parts
    (``data.num_context=0``, no context frames).
    """
    if num_frames < 1 or num_segments < 0:
        raise ValueError(f"need at least one frame and no negative segment count, got {num_frames} frames, {num_segments} segments")
    parts = []
    for i in range(num_segments):
        lo = i * num_frames // num_segments
        parts.append(range(lo, max((i + 1) * num_frames // num_segments, lo + 1)))
    return parts


def train_context_indices(num_frames: int, num_context: int, rng: random.Random) -> list[int]:
    """One frame drawn at random from each of ``num_context`` equal segments (global view of the video)."""
    return [rng.choice(part) for part in segments(num_frames, num_context)]


def eval_context_indices(num_frames: int, num_context: int) -> list[int]:
    """The middle frame of each segment: a fixed context for the whole video at evaluation."""
    return [part[len(part) // 2] for part in segments(num_frames, num_context)]


def train_query_indices(num_frames: int, num_query: int, rng: random.Random) -> list[int]:
    """``num_query`` consecutive frames from a random start (the local window that gets masks)."""
    if num_frames < num_query:
        raise ValueError(f"{num_frames} frames cannot hold {num_query} consecutive query frames")
    start = rng.randrange(num_frames - num_query + 1)
    return list(range(start, start + num_query))


EXPRESSION_SAMPLING = ("uniform", "pairs")


def check_expression_sampling(sampling: str) -> None:
    """Fail with the config key and the valid values (a typo would otherwise surface in a loader worker)."""
    if sampling not in EXPRESSION_SAMPLING:
        raise ValueError(f"data.expression_sampling={sampling!r} is not valid; valid: {', '.join(EXPRESSION_SAMPLING)}")


def choose_expressions(expressions: list[Expression], max_expressions: int, rng: random.Random,
                       sampling: str = "uniform") -> list[Expression]:
    """Up to ``max_expressions`` distinct expressions (each is its own conversation).

    ``uniform``: a random sample in random order. ``pairs`` gives the object-contrastive loss something to compare:
    a random anchor, then (if the video has one) a random expression of the same object set (the positive), then
    expressions of other object sets (the hard negatives) in random order; when those run out, more expressions of
    the anchor's object set, so no sample is smaller than with ``uniform``.
    """
    check_expression_sampling(sampling)
    count = min(max_expressions, len(expressions))
    if sampling == "uniform":
        return rng.sample(expressions, count)
    anchor, *rest = rng.sample(expressions, len(expressions))
    same = [e for e in rest if set(e.obj_ids) == set(anchor.obj_ids)]
    other = [e for e in rest if set(e.obj_ids) != set(anchor.obj_ids)]
    return ([anchor, *same[:1], *other, *same[1:]])[:count]


def plan_train(record: VideoRecord, num_context: int, num_query: int, max_expressions: int, rng: random.Random,
               expression_sampling: str = "uniform") -> SamplePlan:
    """GLUS training sample; ``RecordError`` names the video when it cannot give one."""
    if record.num_frames < num_query:
        raise RecordError(f"{record.key}: {record.num_frames} frames, fewer than the {num_query} query frames of a training sample")
    if not record.expressions:
        raise RecordError(f"{record.key}: no expressions to train on")
    return SamplePlan(
        context=train_context_indices(record.num_frames, num_context, rng),
        query=train_query_indices(record.num_frames, num_query, rng),
        expressions=choose_expressions(record.expressions, max_expressions, rng, expression_sampling),
    )


def plan_eval(record: VideoRecord, num_context: int) -> SamplePlan:
    """Evaluation sample: fixed segment-middle context, every frame as a query, every expression."""
    return SamplePlan(
        context=eval_context_indices(record.num_frames, num_context),
        query=list(range(record.num_frames)),
        expressions=list(record.expressions),
    )


def keep_planned_frames(record: VideoRecord, plan: SamplePlan) -> VideoRecord:
    """The video with only its planned frames' bytes, so a shuffle buffer holds no more than will be decoded."""
    needed = {*plan.context, *plan.query}
    return replace(record, frames=[data if i in needed else b"" for i, data in enumerate(record.frames)])


def squash(frame: np.ndarray, image_size: int) -> Tensor:
    """An RGB ``(H, W, 3)`` frame as uint8 ``[3, S, S]``, squashed (bilinear, antialiased) to ``image_size``.

    torch's uint8 resize is about three times faster than PIL's for video frames to SAM2 size.
    """
    tensor = torch.from_numpy(frame.copy()).permute(2, 0, 1)  # copy: PIL's array is read-only
    if tensor.shape[-2:] != (image_size, image_size):
        tensor = F.interpolate(tensor[None], size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)[0]
    return tensor


def decode_frames(record: VideoRecord, indices: list[int], image_size: int) -> Tensor:
    """Frames ``indices`` of a video as uint8 ``[N, 3, S, S]``; a frame needed twice is decoded once.

    Each frame is squashed straight into its row of the output (no second copy of the stack while stacking).
    """
    out = torch.empty((len(indices), 3, image_size, image_size), dtype=torch.uint8)
    first: dict[int, int] = {}
    for row, index in enumerate(indices):
        if index in first:
            out[row] = out[first[index]]
        else:
            first[index] = row
            out[row] = squash(record.decode_frame(index), image_size)
    return out


def build_sample(record: VideoRecord, plan: SamplePlan, image_size: int, lazy_targets: bool = False) -> VideoSample:
    """Decode only the planned frames; targets are per-expression unions of object masks at full resolution.

    Training samples decode their targets here (``DenseTargets``). ``lazy_targets`` (evaluation: every frame, every
    expression) keeps the planned frames' per-object RLE instead (``ObjectTargets``), decoded one expression at a
    time when it is scored, so the sample's size does not grow with the number of expressions.
    """
    if lazy_targets:
        targets: Targets = ObjectTargets.of(record, plan.query, [e.obj_ids for e in plan.expressions])
    else:
        targets = DenseTargets([torch.from_numpy(np.stack([record.expression_mask(e, i) for i in plan.query]))
                                for e in plan.expressions])
    return VideoSample(
        dataset=record.dataset,
        video=record.video,
        object_ids=tuple(record.object_ids),
        plan=plan,
        query_frame_names=[record.frame_names[i] for i in plan.query],
        frames=decode_frames(record, plan.context + plan.query, image_size),
        targets=targets,
    )

