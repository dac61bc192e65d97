"""Ground-truth targets of a batch's expressions, built when they are used.

The target of expression ``e`` is uint8 {0, 1} ``[Q, H, W]``: in each of its video's Q query frames, the union
of the masks of the objects it refers to, at the video's original resolution. Both kinds of ``Targets`` give it
with ``expression_target(e)`` (on the batch's device) and its frame size with ``size(e)``:

- ``DenseTargets`` (training): every target decoded in the loader worker. A training sample has a few query
  frames and expressions, and the loss wants all of them at once (``RefVOSBatch.masks``).
- ``ObjectTargets`` (evaluation): the per-object COCO RLE of the query frames, as stored in ``masks.json``
  (a few KB per object). An evaluation sample has every frame and every expression of its video, and a dense
  target is 74 MB for a MeViS-size video (80 frames at 720p), so each target is decoded only when it is
  scored, one expression at a time, and the sample's size does not grow with its expressions.

Both give the same bytes: ``VideoRecord.expression_mask`` takes the ``np.maximum`` of the objects' decoded {0, 1}
masks, ``ObjectTargets`` merges a frame's object RLEs (a union) and decodes the result once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datamodules.records import RecordError, VideoRecord, decode_union


class Targets:
    """The E targets of a batch (see the module doc)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def size(self, e: int) -> tuple[int, int]:
        """``(H, W)`` of expression ``e``'s video (the resolution predictions are scored at)."""
        raise NotImplementedError

    def expression_target(self, e: int) -> Tensor:
        """uint8 {0, 1} ``[Q, H, W]`` target of expression ``e``, on the batch's device."""
        raise NotImplementedError

    def dense(self) -> list[Tensor]:
        """Every target at once (training batches hold them anyway)."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Targets:
        raise NotImplementedError

    @staticmethod
    def cat(parts: Sequence[Targets]) -> Targets:
        """The targets of several videos' samples, in order (what collating a batch does)."""
        kinds = {type(p) for p in parts}
        if len(kinds) != 1:
            raise TypeError(f"cannot collate samples with different kinds of targets: {sorted(k.__name__ for k in kinds)}")
        return kinds.pop()._cat(list(parts))


@dataclass
class DenseTargets(Targets):
    """Decoded targets, one uint8 ``[Q, H_e, W_e]`` tensor per expression."""

    masks: list[Tensor]

    def __len__(self) -> int:
        return len(self.masks)

    def size(self, e: int) -> tuple[int, int]:
        return tuple(self.masks[e].shape[-2:])

    def expression_target(self, e: int) -> Tensor:
        return self.masks[e]

    def dense(self) -> list[Tensor]:
        return self.masks

    def to(self, device: torch.device | str) -> DenseTargets:
        return DenseTargets([m.to(device) for m in self.masks])

    @staticmethod
    def _cat(parts: list[DenseTargets]) -> DenseTargets:
        return DenseTargets([m for p in parts for m in p.masks])


@dataclass  # not frozen: Lightning's bf16-true plugin rebuilds dataclasses in a batch field by field
class ObjectMasks:
    """One video's object masks in its query frames: COCO RLE (or None where the object is absent) per frame."""

    key: str  # the video's sample key, for error messages
    num_frames: int  # T query frames
    height: int
    width: int
    rles: dict[int, list[dict[str, Any] | None]]  # obj_id -> one entry per query frame

    @classmethod
    def of(cls, record: VideoRecord, frames: list[int], obj_ids: set[int]) -> ObjectMasks:
        """The stored RLE of ``obj_ids`` in ``frames``, unchanged (no decoding); sizes are checked here, in the loader."""
        rles = {}
        for obj_id in sorted(obj_ids):
            if obj_id not in record.masks:
                raise RecordError(f"{record.key}: object {obj_id} has no masks (objects: {record.object_ids})")
            per_frame = [record.masks[obj_id][i] for i in frames]
            for i, rle in zip(frames, per_frame, strict=True):
                if rle is None:
                    continue
                size = rle.get("size") if isinstance(rle, dict) else None
                if not isinstance(size, list | tuple) or list(size) != [record.height, record.width]:
                    raise RecordError(
                        f"{record.key}: mask of object {obj_id} frame {i} is {size!r}, video is {(record.height, record.width)}"
                    )
            rles[obj_id] = per_frame
        return cls(record.key, len(frames), record.height, record.width, rles)

    def union(self, obj_ids: tuple[int, ...]) -> np.ndarray:
        """uint8 {0, 1} ``(T, H, W)``: the union of ``obj_ids``' masks in each frame (merged as RLE, decoded once)."""
        target = np.zeros((self.num_frames, self.height, self.width), dtype=np.uint8)
        for t in range(self.num_frames):
            present = [self.rles[obj_id][t] for obj_id in obj_ids if self.rles[obj_id][t] is not None]
            if present:
                target[t] = decode_union(present, f"{self.key}: masks.json objects {list(obj_ids)} query frame {t}")
        return target


@dataclass
class ObjectTargets(Targets):
    """Per-object RLE of each video; expression ``e``'s target is decoded by ``expression_target(e)``."""

    videos: list[ObjectMasks]  # B
    expression_video: list[int]  # E: the video (0..B-1) of each expression
    expression_objects: list[tuple[int, ...]]  # E
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def of(cls, record: VideoRecord, frames: list[int], expression_objects: list[tuple[int, ...]]) -> ObjectTargets:
        """Targets of one video's expressions in its query ``frames``."""
        objects = {o for objs in expression_objects for o in objs}
        masks = ObjectMasks.of(record, frames, objects)
        return cls([masks], [0] * len(expression_objects), list(expression_objects))

    def __len__(self) -> int:
        return len(self.expression_objects)

    def size(self, e: int) -> tuple[int, int]:
        video = self.videos[self.expression_video[e]]
        return video.height, video.width

    def expression_target(self, e: int) -> Tensor:
        target = self.videos[self.expression_video[e]].union(self.expression_objects[e])
        return torch.from_numpy(target).to(self.device)

    def dense(self) -> list[Tensor]:
        raise TypeError(
            "evaluation targets are built one expression at a time, when scored: use batch.targets.expression_target(e) "
            "(all of them at once would be every expression's [T, H, W] mask)"
        )

    def to(self, device: torch.device | str) -> ObjectTargets:
        return ObjectTargets(self.videos, self.expression_video, self.expression_objects, torch.device(device))

    @staticmethod
    def _cat(parts: list[ObjectTargets]) -> ObjectTargets:
        videos, expression_video, expression_objects = [], [], []
        for part in parts:
            expression_video += [len(videos) + v for v in part.expression_video]
            videos += part.videos
            expression_objects += part.expression_objects
        return ObjectTargets(videos, expression_video, expression_objects, parts[0].device)
