"""What the model sees of every frame of a video before tracking it: the material the keyframe scorer rates."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from glus_lightning.keyframes.scorer import FrameScorer
from glus_lightning.segmentation import FrameFeatures, MemorySegmenter, TrackOutput
from glus_lightning.segmentation.segmenter import cat_tracks


@dataclass
class FrameEvidence:
    """Every (expression, frame) of one video as a keyframe would see it."""

    prompts: Tensor  # [E, T, prompt_dim] projected [SEG] embeddings
    features: FrameFeatures  # [T] SAM2 image features
    memoryless: TrackOutput  # [E, T] each frame segmented with an empty memory (as a keyframe would be)

    @property
    def scorer_inputs(self) -> Tensor:  # [E, T, prompt_dim + 2]
        return FrameScorer.inputs(self.prompts, self.memoryless.iou_pred, self.memoryless.object_score_logits)


def collect_evidence(segmenter: MemorySegmenter, frames: Tensor, windows: Iterable[tuple[list[int], Tensor]]) -> FrameEvidence:
    """``FrameEvidence`` of one video: ``frames [T, 3, S, S]`` (uint8), ``windows`` its consecutive (frame ids,
    prompts ``[E, w, P]``) in order; each frame is encoded once and segmented once per expression without memory."""
    prompts, levels, memoryless = [], [], []
    features = None
    for frame_ids, window_prompts in windows:
        num_exp = window_prompts.shape[0]
        features = segmenter.encode_frames(frames[frame_ids])
        rows = torch.arange(len(frame_ids), device=window_prompts.device).repeat(num_exp)  # expression-major
        out = segmenter.segment_without_memory(features[rows], window_prompts.flatten(0, 1))
        memoryless.append(TrackOutput(out.mask_logits.unflatten(0, (num_exp, -1))[:, :, 0],
                                      out.iou_pred.view(num_exp, -1), out.object_score_logits.view(num_exp, -1)))
        prompts.append(window_prompts)
        levels.append(features.levels)
    if features is None:
        raise ValueError("collect_evidence got no window of frames")
    return FrameEvidence(
        prompts=torch.cat(prompts, dim=1),
        features=FrameFeatures(tuple(torch.cat(level) for level in zip(*levels, strict=True)), features.pos),
        memoryless=cat_tracks(memoryless),
    )
