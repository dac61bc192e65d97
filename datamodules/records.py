"""One video as stored in a WebDataset shard: frames, per-object masks and metadata.

A shard sample (one video) holds these members, all under one key ``<dataset>/<video>``:

- ``meta.json``: ``{"dataset", "video", "frames": [names], "height", "width",
  "expressions": [{"exp_id", "text", "obj_ids"}], "objects": [ids]}``
- ``masks.json``: ``{"<obj_id>": [COCO RLE (counts as str) or null per frame]}``. RLE keeps masks
  exact and small, and a frame's mask is only decoded when it is sampled.
- ``f00000.jpg`` ... : the source frame bytes, copied unchanged (no re-encoding).

Frames and masks decode lazily, so a training sample pays only for the frames it uses.

This layout is shard format version ``SHARD_FORMAT_VERSION``, recorded in every prepared split's
``manifest.json`` (:mod:`datamodules.shards`); readers refuse a split whose version is not in
``READABLE_SHARD_FORMATS`` rather than misread it.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

SHARD_FORMAT_VERSION = 1
"""Version of the shard sample layout described above (its members, their fields and what they mean).

Whoever changes what ``VideoRecord.to_sample`` writes or what ``VideoRecord.from_sample`` expects bumps it, and keeps in
``READABLE_SHARD_FORMATS`` only the versions ``from_sample`` still reads correctly. Version 1 is the layout written since
the first release (unchanged up to the introduction of this constant): manifests written before they recorded a version
hold version 1.
"""

READABLE_SHARD_FORMATS: tuple[int, ...] = (1,)


class RecordError(ValueError):
    """A stored video is malformed; the message names the sample key and the member."""


@dataclass(frozen=True)
class Expression:
    exp_id: str
    text: str
    obj_ids: tuple[int, ...]


@dataclass
class VideoRecord:
    dataset: str
    video: str
    frame_names: list[str]
    height: int
    width: int
    expressions: list[Expression]
    frames: list[bytes]  # encoded image bytes, one per frame
    masks: dict[int, list[dict[str, Any] | None]]  # obj_id -> RLE or None per frame
    _cache: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def key(self) -> str:
        return sample_key(self.dataset, self.video)

    @property
    def num_frames(self) -> int:
        return len(self.frame_names)

    @property
    def object_ids(self) -> list[int]:
        return sorted(self.masks)

    def decode_frame(self, index: int) -> np.ndarray:
        """RGB uint8 array ``(H, W, 3)`` of frame ``index``."""
        try:
            with Image.open(io.BytesIO(self.frames[index])) as img:
                return np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as err:
            raise RecordError(f"{self.key}: frame {index} ({self.frame_names[index]}) is not a readable image: {err}") from err

    def object_mask(self, obj_id: int, index: int) -> np.ndarray:
        """Binary uint8 mask ``(H, W)`` of one object in one frame (zeros where it is absent)."""
        cached = self._cache.get((obj_id, index))
        if cached is not None:
            return cached
        if obj_id not in self.masks:
            raise RecordError(f"{self.key}: object {obj_id} has no masks (objects: {self.object_ids})")
        rle = self.masks[obj_id][index]
        if rle is None:
            mask = np.zeros((self.height, self.width), dtype=np.uint8)
        else:
            mask = decode_rle(rle, f"{self.key}: masks.json object {obj_id} frame {index}")
            if mask.shape != (self.height, self.width):
                raise RecordError(
                    f"{self.key}: mask of object {obj_id} frame {index} is {mask.shape}, video is {(self.height, self.width)}"
                )
        self._cache[(obj_id, index)] = mask
        return mask

    def expression_mask(self, expression: Expression, index: int) -> np.ndarray:
        """Target of an expression: the union of its objects' masks, clamped to {0, 1}."""
        target = np.zeros((self.height, self.width), dtype=np.uint8)
        for obj_id in expression.obj_ids:
            np.maximum(target, self.object_mask(obj_id, index), out=target)
        return target

    def to_sample(self) -> dict[str, Any]:
        """The WebDataset sample dict (``__key__`` plus member bytes) that stores this video."""
        meta = {
            "dataset": self.dataset,
            "video": self.video,
            "frames": self.frame_names,
            "height": self.height,
            "width": self.width,
            "objects": self.object_ids,
            "expressions": [{"exp_id": e.exp_id, "text": e.text, "obj_ids": list(e.obj_ids)} for e in self.expressions],
        }
        sample: dict[str, Any] = {
            "__key__": self.key,
            "meta.json": json.dumps(meta).encode(),
            "masks.json": json.dumps({str(k): v for k, v in self.masks.items()}).encode(),
        }
        for i, data in enumerate(self.frames):
            sample[frame_member(i)] = data
        return sample

    @classmethod
    def from_sample(cls, sample: dict[str, Any]) -> VideoRecord:
        """Parse a WebDataset sample dict (raw bytes members); raises ``RecordError`` naming what is wrong."""
        key = sample.get("__key__", "?")
        where = f"{sample.get('__url__', '?')}:{key}"
        meta = _load_json(sample, "meta.json", where)
        masks_raw = _load_json(sample, "masks.json", where)
        try:
            frame_names = list(meta["frames"])
            expressions = [Expression(str(e["exp_id"]), str(e["text"]), tuple(int(o) for o in e["obj_ids"])) for e in meta["expressions"]]
            record = cls(
                dataset=str(meta["dataset"]),
                video=str(meta["video"]),
                frame_names=frame_names,
                height=int(meta["height"]),
                width=int(meta["width"]),
                expressions=expressions,
                frames=[],
                masks={int(k): list(v) for k, v in masks_raw.items()},
            )
        except (KeyError, TypeError, ValueError) as err:
            raise RecordError(f"{where}: meta.json/masks.json lack or mistype a field: {err!r}") from err
        for i in range(len(frame_names)):
            data = sample.get(frame_member(i))
            if not isinstance(data, (bytes, bytearray)):
                raise RecordError(f"{where}: member {frame_member(i)} (frame {frame_names[i]}) is missing")
            record.frames.append(bytes(data))
        for obj_id, per_frame in record.masks.items():
            if len(per_frame) != len(frame_names):
                raise RecordError(f"{where}: object {obj_id} has {len(per_frame)} masks for {len(frame_names)} frames")
        for e in expressions:
            absent = [o for o in e.obj_ids if o not in record.masks]
            if absent:
                raise RecordError(f"{where}: expression {e.exp_id} refers to objects {absent} without masks")
        return record


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def sample_key(dataset: str, video: str) -> str:
    """WebDataset key of a video; dots and other separators are replaced (the real name is in meta)."""
    return f"{_KEY_UNSAFE.sub('_', dataset)}/{_KEY_UNSAFE.sub('_', video)}"


def frame_member(index: int) -> str:
    return f"f{index:05d}.jpg"


def encode_rle(mask: np.ndarray) -> dict[str, Any] | None:
    """Compressed COCO RLE of a binary mask (counts as str), or None for an empty mask."""
    if not mask.any():
        return None
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_rle(rle: dict[str, Any], where: str) -> dict[str, Any]:
    """A COCO RLE (compressed str/bytes counts or an uncompressed list) in pycocotools' own form (bytes counts)."""
    try:
        size = [int(s) for s in rle["size"]]
        counts = rle["counts"]
        if isinstance(counts, list):
            return coco_mask.frPyObjects({"size": size, "counts": counts}, *size)
        return {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise RecordError(f"{where}: malformed RLE ({err!r})") from err


def decode_rle(rle: dict[str, Any], where: str) -> np.ndarray:
    """Binary uint8 mask from a COCO RLE (compressed str/bytes counts or an uncompressed list)."""
    compressed = coco_rle(rle, where)
    try:
        return coco_mask.decode(compressed).astype(np.uint8)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise RecordError(f"{where}: malformed RLE ({err!r})") from err


def decode_union(rles: list[dict[str, Any]], where: str) -> np.ndarray:
    """Binary uint8 mask ``(H, W)``: the union of same-size COCO RLEs, merged as RLE and decoded once.

    The same bytes as the ``np.maximum`` of the decoded masks, for one decode instead of one per RLE.
    """
    compressed = [coco_rle(rle, where) for rle in rles]
    try:
        merged = compressed[0] if len(compressed) == 1 else coco_mask.merge(compressed, intersect=False)
        return coco_mask.decode(merged)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise RecordError(f"{where}: malformed RLE ({err!r})") from err


def _load_json(sample: dict[str, Any], member: str, where: str) -> Any:
    data = sample.get(member)
    if data is None:
        raise RecordError(f"{where}: member {member} is missing")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise RecordError(f"{where}: {member} is not valid JSON ({err})") from err
