"""Keyframe propagation: each expression's track starts at the frame the scorer rates best, then runs both ways."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields

import torch
from torch import Tensor

from glus_lightning.keyframes.evidence import FrameEvidence
from glus_lightning.keyframes.scorer import FrameScorer
from glus_lightning.segmentation import FrameFeatures, MemoryBank, MemorySegmenter, TrackOutput

FrameSource = FrameFeatures | Callable[[Tensor], FrameFeatures]
"""A video's SAM2 image features: all of them (``[T]``), or a function computing those of some frames (``index [K]``)."""


def pick_keyframes(scorer: FrameScorer, evidence: FrameEvidence) -> list[int]:
    """Each expression's keyframe: the frame of highest predicted IoU (a scorer that was never fitted is refused)."""
    if not bool(scorer.refined):
        raise RuntimeError(
            "inference.keyframes=true needs a refined frame scorer, and this model's was never fitted: run "
            "`glus refine-scores ckpt_path=...` and use the checkpoint it writes (glus fit refines it before each validation)"
        )
    return scorer(evidence.scorer_inputs).argmax(dim=1).tolist()


def propagation_order(num_frames: int, keyframe: int) -> tuple[list[int], list[int]]:
    """Frames visited from ``keyframe``: forward ``[keyframe, ..., T-1]`` (keyframe first), backward ``[keyframe-1, ..., 0]``."""
    if not 0 <= keyframe < num_frames:
        raise ValueError(f"keyframe {keyframe} is not a frame of a {num_frames}-frame video")
    return list(range(keyframe, num_frames)), list(range(keyframe - 1, -1, -1))


def track_from_keyframes(segmenter: MemorySegmenter, frames: FrameSource, prompts: Tensor, keyframes: Sequence[int]) -> TrackOutput:
    """Every track of ``stream_from_keyframes`` put together in frame order: outputs ``[N, T]``, every frame exactly once."""
    n, t = prompts.shape[:2]
    outputs: dict[str, Tensor] = {}
    for rows, where, track in stream_from_keyframes(segmenter, frames, prompts, keyframes):
        valid = where >= 0
        row = rows[:, None].expand_as(where)[valid]
        for f in fields(track):
            value = getattr(track, f.name)
            if f.name not in outputs:
                outputs[f.name] = value.new_empty((n, t, *value.shape[2:]))
            outputs[f.name][row, where[valid]] = value[valid]
    return TrackOutput(**outputs)


def stream_from_keyframes(segmenter: MemorySegmenter, frames: FrameSource, prompts: Tensor, keyframes: Sequence[int],
                          chunk: int | None = None) -> Iterator[tuple[Tensor, Tensor, TrackOutput]]:
    """Each track starts at its keyframe with an empty memory, then runs forward to the video's end and, from a copy
    of the memory holding only the keyframe, backward to its start.

    ``frames`` are the video's ``T`` frames' features (or computed on demand), ``prompts [N, T, prompt_dim]``,
    ``keyframes`` one frame index per track. Yields ``(rows [R], frames [R, c], track [R, c])`` as the outputs become
    final, ``chunk`` steps at a time (default: whole sweeps): the tracks ``rows`` at their frames ``frames`` (-1: a
    padding step, no frame). With a function as ``frames`` and a ``chunk``, only a chunk's features exist at a time.

    Tracks with different keyframes run in one batched pass (a forward and a backward sweep), not one per keyframe:
    each track's frames are renumbered so that all keyframes get the same index. The memory bank only ever uses frame
    distances, except SAM2's every-``eval_stride``-th-frame rule, which keeps its meaning when the renumbering shifts
    by multiples of the stride: tracks whose keyframes differ by a multiple of it share a pass (one pass at stride 1,
    the default; at most ``eval_stride`` passes). A track whose sweep is shorter than the longest runs padding steps
    on its last frame; rows are independent, and those outputs are marked -1.
    """
    n, t = prompts.shape[:2]
    if callable(frames):
        encode = frames
    else:
        if len(frames.shape) != 1 or frames.shape[0] != t:
            raise ValueError(f"stream_from_keyframes expects features (T,) for prompts (N, T, P), got {tuple(frames.shape)} "
                             f"and {tuple(prompts.shape)}")
        encode = frames.__getitem__
    if len(keyframes) != n:
        raise ValueError(f"stream_from_keyframes expects one keyframe per track: {len(keyframes)} for prompts {tuple(prompts.shape)}")
    keyframes = [int(k) for k in keyframes]
    for k in keyframes:
        propagation_order(t, k)  # checks the range
    stride = 1 if segmenter.training else segmenter.protocol.eval_stride
    for residue in sorted({k % stride for k in keyframes}):
        rows = torch.tensor([i for i, k in enumerate(keyframes) if k % stride == residue], device=prompts.device)
        starts = torch.tensor([keyframes[i] for i in rows.tolist()], device=prompts.device)
        for where, track in _sweeps(segmenter, encode, prompts[rows], starts, t, chunk):
            yield rows, torch.where((where >= 0) & (where < t), where, -1), track


def _sweeps(segmenter: MemorySegmenter, encode: Callable[[Tensor], FrameFeatures], prompts: Tensor, starts: Tensor,
            num_frames: int, chunk: int | None) -> Iterator[tuple[Tensor, TrackOutput]]:
    """The forward and backward sweeps of R tracks starting at ``starts`` [R] (their differences multiples of the
    memory stride), ``chunk`` steps at a time: ``(frames [R, c], track [R, c])``, ``frames`` outside the video where a
    track pads."""
    base, first = int(starts.max()), int(starts.min())
    forward = starts[:, None] + torch.arange(num_frames - first, device=starts.device)  # the keyframe, then on to the end
    memory = segmenter.new_memory(len(starts))
    yield forward[:, :1], _track(segmenter, encode, prompts, forward[:, :1], memory, [base])  # empty memory
    behind = memory.fork()  # holds only the keyframe's memory
    yield from _chunks(segmenter, encode, prompts, forward[:, 1:], memory, range(base + 1, base + forward.shape[1]), chunk)
    backward = starts[:, None] - 1 - torch.arange(base, device=starts.device)
    yield from _chunks(segmenter, encode, prompts, backward, behind, range(base - 1, -1, -1), chunk)


def _chunks(segmenter: MemorySegmenter, encode: Callable[[Tensor], FrameFeatures], prompts: Tensor, frames: Tensor,
            memory: MemoryBank, frame_ids: Sequence[int], chunk: int | None) -> Iterator[tuple[Tensor, TrackOutput]]:
    step = chunk or max(frames.shape[1], 1)
    for i in range(0, frames.shape[1], step):
        yield frames[:, i : i + step], _track(segmenter, encode, prompts, frames[:, i : i + step], memory, frame_ids[i : i + step])


def _track(segmenter: MemorySegmenter, encode: Callable[[Tensor], FrameFeatures], prompts: Tensor, frames: Tensor,
           memory: MemoryBank, frame_ids: Sequence[int]) -> TrackOutput:
    """``segmenter.track`` of each row over its own ``frames`` [R, S] (clamped into the video: padding steps), each
    distinct frame's features computed once."""
    index = frames.clamp(0, prompts.shape[1] - 1)
    distinct, inverse = torch.unique(index, return_inverse=True)
    rows = torch.arange(len(frames), device=frames.device)[:, None]
    features = segmenter.select(encode(distinct), inverse)
    return segmenter.track(features, prompts[rows, index], memory=memory, frame_ids=list(frame_ids))
