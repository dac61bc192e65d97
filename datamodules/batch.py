"""The typed batch that every datamodule yields and ``GLUSModule`` consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from datamodules.targets import Targets


@dataclass
class RefVOSBatch:
    """B videos and the E expressions sampled from them.

    Frames are uint8, squashed to a square ``image_size`` (the segmenter's input); each backbone
    turns them into its own pixel input on the device (its per-backbone processing hook), so one
    decoded frame serves both. Per video the C context frames come first, then the query frames:
    training takes Q consecutive query frames, evaluation takes every frame of the video.
    Expressions of one video share its frames (one conversation each). Targets are decoded in the loader for
    training (``DenseTargets``, also ``masks``) and kept as per-object RLE for evaluation (``ObjectTargets``: one
    expression's target is built with ``targets.expression_target(e)`` when it is scored).
    """

    frames: Tensor  # uint8 [B, C + Q, 3, S, S]
    num_context: int  # C
    frame_indices: Tensor  # long [B, C + Q]: index of each frame in its video
    expressions: list[str]  # E texts, normalised (lower case, no trailing period)
    expression_ids: list[str]  # E dataset expression ids
    expression_video: Tensor  # long [E]: the video (0..B-1) of each expression
    expression_objects: list[tuple[int, ...]]  # E object-id sets
    targets: Targets  # E targets, uint8 {0,1} [Q, H_v, W_v] at the video's original resolution (datamodules/targets.py)
    video_ids: list[str]  # B
    datasets: list[str]  # B
    video_objects: list[tuple[int, ...]]  # B: every object id of the video
    frame_names: list[list[str]]  # B lists of Q names of the query frames
    # B (H, W): each video's original frame size, before the squash to S (backbone.image_resize=center_crop crops
    # the original's centre square out of the squashed frame); None in batches made without it (benchmarks)
    video_sizes: list[tuple[int, int]] | None = None

    @property
    def masks(self) -> list[Tensor]:
        """Every expression's target at once: training batches (a few query frames). Evaluation batches carry
        per-object RLE instead and refuse this: build one target at a time with ``targets.expression_target(e)``."""
        return self.targets.dense()

    @property
    def num_query(self) -> int:
        return self.frames.shape[1] - self.num_context

    @property
    def context_frames(self) -> Tensor:
        return self.frames[:, : self.num_context]

    @property
    def query_frames(self) -> Tensor:
        return self.frames[:, self.num_context :]

    def to(self, device: torch.device | str) -> RefVOSBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        moved["targets"] = self.targets.to(device)
        return replace(self, **moved)
