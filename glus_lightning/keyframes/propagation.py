"""Keyframe propagation: each expression's track starts at the frame the scorer rates best, then runs both ways."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

import torch
from torch import Tensor

from glus_lightning.keyframes.evidence import FrameEvidence
from glus_lightning.keyframes.scorer import FrameScorer
from glus_lightning.segmentation import FrameFeatures, MemoryBank, MemorySegmenter, TrackOutput


def pick_keyframes(scorer: FrameScorer, evidence: FrameEvidence) -> list[int]:
    """Each expression's keyframe: the frame of highest predicted IoU (a scorer that was never fitted is refused)."""
    if not bool(scorer.refined):
        raise RuntimeError(
            "inference.keyframes=true needs a refined frame scorer, and this model's was never fitted: run "
            "`glus refine-scores ckpt_path=...` and use the checkpoint it writes (glus fit refines it before each validation)"
        )
    return scorer(evidence.scorer_inputs).argmax(dim=1).tolist()


def predict_from_keyframes(scorer: FrameScorer, segmenter: MemorySegmenter, evidence: FrameEvidence) -> Tensor:
    """Mask logits ``[E, T, h, w]`` of one video, every expression tracked from its own keyframe."""
    keyframes = pick_keyframes(scorer, evidence)
    return track_from_keyframes(segmenter, evidence.features, evidence.prompts, keyframes).mask_logits


def propagation_order(num_frames: int, keyframe: int) -> tuple[list[int], list[int]]:
    """Frames visited from ``keyframe``: forward ``[keyframe, ..., T-1]`` (keyframe first), backward ``[keyframe-1, ..., 0]``."""
    if not 0 <= keyframe < num_frames:
        raise ValueError(f"keyframe {keyframe} is not a frame of a {num_frames}-frame video")
    return list(range(keyframe, num_frames)), list(range(keyframe - 1, -1, -1))


def track_from_keyframes(segmenter: MemorySegmenter, features: FrameFeatures, prompts: Tensor,
                         keyframes: Sequence[int]) -> TrackOutput:
    """Each track starts at its keyframe with an empty memory, then runs forward to the video's end and, from a copy
    of the memory holding only the keyframe, backward to its start.

    ``features [T]`` are the video's frames, ``prompts [N, T, prompt_dim]``, ``keyframes`` one frame index per
    track. Outputs are in frame order, every frame exactly once.

    Tracks with different keyframes run in one batched pass (a forward and a backward sweep), not one per keyframe:
    each track's frames are renumbered so that all keyframes get the same index. The memory bank only ever uses frame
    distances, except SAM2's every-``eval_stride``-th-frame rule, which keeps its meaning when the renumbering shifts
    by multiples of the stride: tracks whose keyframes differ by a multiple of it share a pass (one pass at stride 1,
    the default; at most ``eval_stride`` passes). A track whose sweep is shorter than the longest runs padding steps
    on its last frame; rows are independent, and those outputs are dropped.
    """
    n, t = prompts.shape[:2]
    if len(features.shape) != 1 or features.shape[0] != t or len(keyframes) != n:
        raise ValueError(
            f"track_from_keyframes expects features (T,), prompts (N, T, P) and N keyframes, "
            f"got {tuple(features.shape)}, {tuple(prompts.shape)} and {len(keyframes)} keyframes"
        )
    keyframes = [int(k) for k in keyframes]
    for k in keyframes:
        propagation_order(t, k)  # checks the range
    stride = 1 if segmenter.training else segmenter.protocol.eval_stride
    outputs: dict[str, Tensor] = {}
    for residue in sorted({k % stride for k in keyframes}):
        rows = torch.tensor([i for i, k in enumerate(keyframes) if k % stride == residue], device=prompts.device)
        starts = torch.tensor([keyframes[i] for i in rows.tolist()], device=prompts.device)
        for frames, track in _sweeps(segmenter, features, prompts[rows], starts, t):
            valid = (frames >= 0) & (frames < t)
            row = rows[:, None].expand_as(frames)[valid]
            for f in fields(track):
                value = getattr(track, f.name)
                if f.name not in outputs:
                    outputs[f.name] = value.new_empty((n, t, *value.shape[2:]))
                outputs[f.name][row, frames[valid]] = value[valid]
    return TrackOutput(**outputs)


def _sweeps(segmenter: MemorySegmenter, features: FrameFeatures, prompts: Tensor, starts: Tensor,
            num_frames: int) -> list[tuple[Tensor, TrackOutput]]:
    """The forward and backward sweeps of R tracks starting at ``starts`` [R] (their differences multiples of the
    memory stride): ``(frames [R, S], track [R, S])`` per sweep, ``frames`` outside the video where a track pads."""
    base, first = int(starts.max()), int(starts.min())
    steps = torch.arange(num_frames - first, device=starts.device)
    forward = starts[:, None] + steps  # the keyframe, then on to the end
    memory = segmenter.new_memory(len(starts))
    keyframe = _track(segmenter, features, prompts, forward[:, :1], memory, [base])  # empty memory
    behind = memory.fork()  # holds only the keyframe's memory
    sweeps = [(forward[:, :1], keyframe)]
    if len(steps) > 1:
        sweeps.append((forward[:, 1:], _track(segmenter, features, prompts, forward[:, 1:], memory, range(base + 1, base + len(steps)))))
    if base > 0:
        backward = starts[:, None] - 1 - torch.arange(base, device=starts.device)
        sweeps.append((backward, _track(segmenter, features, prompts, backward, behind, range(base - 1, -1, -1))))
    return sweeps


def _track(segmenter: MemorySegmenter, features: FrameFeatures, prompts: Tensor, frames: Tensor, memory: MemoryBank,
           frame_ids: Sequence[int]) -> TrackOutput:
    """``segmenter.track`` of each row over its own ``frames`` [R, S] (clamped into the video: padding steps)."""
    index = frames.clamp(0, features.shape[0] - 1)
    rows = torch.arange(len(frames), device=frames.device)[:, None]
    return segmenter.track(segmenter.select(features, index), prompts[rows, index], memory=memory, frame_ids=list(frame_ids))
