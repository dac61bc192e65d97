"""Keyframe propagation: each expression's track starts at the frame the scorer rates best, then runs both ways."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

import torch
from torch import Tensor

from glus_lightning.keyframes.evidence import FrameEvidence
from glus_lightning.keyframes.scorer import FrameScorer
from glus_lightning.segmentation import FrameFeatures, MemoryBank, MemorySegmenter, TrackOutput
from glus_lightning.segmentation.segmenter import cat_tracks


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
    track; tracks sharing a keyframe run together. Outputs are in frame order, every frame exactly once.
    """
    n, t = prompts.shape[:2]
    if len(features.shape) != 1 or features.shape[0] != t or len(keyframes) != n:
        raise ValueError(
            f"track_from_keyframes expects features (T,), prompts (N, T, P) and N keyframes, "
            f"got {tuple(features.shape)}, {tuple(prompts.shape)} and {len(keyframes)} keyframes"
        )
    outputs: list[TrackOutput | None] = [None] * n
    for keyframe in sorted({int(k) for k in keyframes}):
        rows = [i for i, k in enumerate(keyframes) if int(k) == keyframe]
        forward, backward = propagation_order(t, keyframe)
        memory = segmenter.new_memory(len(rows))
        ahead = _track_frames(segmenter, features, prompts[rows], memory, forward[:1])  # the keyframe, empty memory
        behind = memory.fork()  # holds only the keyframe's memory
        parts = [ahead, _track_frames(segmenter, features, prompts[rows], memory, forward[1:]),
                 _track_frames(segmenter, features, prompts[rows], behind, backward)]
        visited = torch.tensor([*forward, *backward], device=prompts.device)
        merged = cat_tracks([p for p in parts if p is not None])
        in_frame_order = visited.argsort()
        for j, row in enumerate(rows):
            outputs[row] = TrackOutput(*(getattr(merged, f.name)[j, in_frame_order] for f in fields(merged)))
    return TrackOutput(*(torch.stack([getattr(o, f.name) for o in outputs]) for f in fields(TrackOutput)))


def _track_frames(segmenter: MemorySegmenter, features: FrameFeatures, prompts: Tensor, memory: MemoryBank,
                  frame_ids: list[int]) -> TrackOutput | None:
    """``segmenter.track`` over ``frame_ids`` of the video (None when there are none), every track on the same frames."""
    if not frame_ids:
        return None
    rows = torch.tensor(frame_ids, device=prompts.device).expand(memory.batch_size, -1)
    return segmenter.track(segmenter.select(features, rows), prompts[:, frame_ids], memory=memory, frame_ids=frame_ids)
