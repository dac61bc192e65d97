"""What the model sees of every frame of a video before tracking it: the material the keyframe scorer rates."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from glus_lightning.keyframes.scorer import FrameScorer
from glus_lightning.segmentation import FrameFeatures, MemorySegmenter


@dataclass
class FrameEvidence:
    """Every (expression, frame) of one video as a keyframe would see it.

    Inference keeps only what the scorer rates and propagation needs (prompts and SAM2's two memoryless scores: a few
    hundred floats per expression and frame); the image features and memoryless masks of every frame, which
    self-refinement measures, are kept only when asked for (``keep_frames``): they grow with the video's length.
    """

    prompts: Tensor  # [E, T, prompt_dim] projected [SEG] embeddings
    iou_pred: Tensor  # [E, T] SAM2's IoU prediction of each frame segmented with an empty memory (as a keyframe would be)
    object_score_logits: Tensor  # [E, T] its object-presence logit
    features: FrameFeatures | None = None  # [T] SAM2 image features (keep_frames only)
    mask_logits: Tensor | None = None  # [E, T, h, w] the memoryless masks (keep_frames only)

    @property
    def scorer_inputs(self) -> Tensor:  # [E, T, prompt_dim + 2]
        return FrameScorer.inputs(self.prompts, self.iou_pred, self.object_score_logits)


def collect_evidence(segmenter: MemorySegmenter, frames: Tensor, windows: Iterable[tuple[list[int], Tensor]],
                     keep_frames: bool = False) -> FrameEvidence:
    """``FrameEvidence`` of one video: ``frames [T, 3, S, S]`` (uint8, on any device), ``windows`` its consecutive (frame
    ids, prompts ``[E, w, P]``) in order; each frame is encoded once and segmented once per expression without memory,
    its features dropped after its window unless ``keep_frames``."""
    prompts, ious, scores, levels, masks = [], [], [], [], []
    features = None
    for frame_ids, window_prompts in windows:
        num_exp = window_prompts.shape[0]
        features = segmenter.encode_frames(frames[frame_ids].to(window_prompts.device))
        rows = torch.arange(len(frame_ids), device=window_prompts.device).repeat(num_exp)  # expression-major
        out = segmenter.segment_without_memory(features[rows], window_prompts.flatten(0, 1))
        prompts.append(window_prompts)
        ious.append(out.iou_pred.view(num_exp, -1))
        scores.append(out.object_score_logits.view(num_exp, -1))
        if keep_frames:
            masks.append(out.mask_logits.unflatten(0, (num_exp, -1))[:, :, 0])
            levels.append(features.levels)
    if features is None:
        raise ValueError("collect_evidence got no window of frames")
    evidence = FrameEvidence(torch.cat(prompts, dim=1), torch.cat(ious, dim=1), torch.cat(scores, dim=1))
    if keep_frames:
        evidence.features = FrameFeatures(tuple(torch.cat(level) for level in zip(*levels, strict=True)), features.pos)
        evidence.mask_logits = torch.cat(masks, dim=1)
    return evidence
