"""Readers of the official MeViS, Ref-YouTube-VOS and Ref-DAVIS17 layouts that yield ``VideoRecord``s.

Decisions, so that a shard always means the same thing:

- Frames are the source JPEG bytes, unchanged. Each is decoded once at 1/8 scale (cheap) to catch
  unreadable or truncated files at conversion time rather than in the middle of training.
- MeViS: an expression's ``obj_id[i]`` has the mask ``mask_dict[anno_id[i]]``; masks are stored
  per object id, the RLE copied as is (a round trip is bit-identical) after checking that it
  decodes to the frame size.
- Ref-YouTube-VOS / Ref-DAVIS17: masks are ``png == obj_id`` of the palette PNGs. Where a labelled
  split annotates only some frames (Ref-YouTube-VOS train: every 5th), a record keeps **only the
  annotated frames**: a frame without a PNG has an unknown mask, and storing it as empty would
  teach the model that the object is absent.
- Unlabelled splits (MeViS without ``mask_dict.json``, e.g. valid; Ref-YouTube-VOS without
  ``Annotations/``) give records with every frame, no masks, and expressions with no object ids
  (they are for inference only); no mask check applies to them.
- Expression text is normalised: whitespace collapsed and stripped, lower-cased, trailing
  periods dropped.

Faults of one video (missing or unreadable frame, malformed RLE or metadata entry, an
expression whose object has no mask in any frame, fewer than ``min_frames`` frames) raise a
``ConversionError`` naming the file, video and expression; with ``skip_bad`` the video is left
out, a line saying why goes to stderr and ``{"video", "reason"}`` is added to ``Source.skipped``.
Faults of a whole split (its metadata file missing or not valid JSON) always raise: nothing of it
could be converted.

The checked readers of the metadata, RLE and PNG formats are shared with ``glus evaluate`` and live in
:mod:`datamodules.formats`.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from datamodules.formats import (
    ConversionError,
    check_rle,
    expression_items,
    frame_names,
    id_list,
    load_json,
    meta_videos,
    read_object_ids,
)
from datamodules.records import Expression, VideoRecord, encode_rle


@dataclass
class Source:
    """One split of an official dataset opened for conversion: its videos, read one at a time."""

    dataset: str
    split: str
    videos: list[str]
    read: Callable[[str], VideoRecord]
    skip_bad: bool
    skipped: list[dict[str, str]] = field(default_factory=list)

    def records(self) -> Iterator[VideoRecord]:
        for video in self.videos:
            try:
                record = self.read(video)
            except ConversionError as err:
                if not self.skip_bad:
                    raise
                # not warnings.warn: raised in this generator, it printed over the progress bar and named the tqdm
                # line that asked for the next record; tqdm.write puts it on a line of its own above the bar
                tqdm.write(f"skipping video {video!r}: {err}", file=sys.stderr)
                self.skipped.append({"video": video, "reason": str(err)})
                continue
            yield record


def normalize_expression(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace and no trailing period (as GLUS trains)."""
    return " ".join(text.split()).lower().rstrip(".").rstrip()


# ---------------------------------------------------------------- MeViS


def open_mevis(root: str | Path, split: str, min_frames: int, skip_bad: bool) -> Source:
    """``<root>/<split>/{JPEGImages/<video>/<frame>.jpg, meta_expressions.json, mask_dict.json}``."""
    split_dir = _split_dir(root, split)
    meta_path = split_dir / "meta_expressions.json"
    videos = meta_videos(meta_path)
    mask_path = split_dir / "mask_dict.json"
    mask_dict = load_json(mask_path) if mask_path.is_file() else None
    if mask_dict is not None and not isinstance(mask_dict, dict):
        raise ConversionError(f"{mask_path}: expected an object {{anno_id: [RLE or null per frame]}}, got {type(mask_dict).__name__}")

    def read(video: str) -> VideoRecord:
        where = f"{meta_path}: video {video!r}"
        names = frame_names(videos[video], where)
        _check_length(len(names), min_frames, where)
        frames, height, width = _read_frames(split_dir / "JPEGImages" / video, names, where)
        masks: dict[int, list[dict[str, Any] | None]] = {}
        checked: dict[str, list[dict[str, Any] | None]] = {}  # anno_id -> its RLEs, checked once per video
        expressions = []
        for exp_id, exp in expression_items(videos[video], where):
            text = _text(exp, f"{where} expression {exp_id}")
            if mask_dict is None:
                expressions.append(Expression(exp_id, text, ()))
                continue
            obj_ids = [int(i) for i in id_list(exp, "obj_id", f"{where} expression {exp_id}")]
            anno_ids = id_list(exp, "anno_id", f"{where} expression {exp_id}")
            if len(obj_ids) != len(anno_ids):
                raise ConversionError(f"{where} expression {exp_id}: obj_id {obj_ids} and anno_id {anno_ids} differ in length")
            for obj_id, anno_id in zip(obj_ids, anno_ids):
                here = f"{where} expression {exp_id} ({text!r}) object {obj_id} (anno_id {anno_id}, {mask_path.name})"
                if anno_id not in checked:
                    checked[anno_id] = _object_rles(mask_dict.get(anno_id), len(names), height, width, here)
                rles = checked[anno_id]
                if obj_id in masks and masks[obj_id] != rles:
                    raise ConversionError(f"{here}: masks differ from those of another anno_id of the same object")
                masks[obj_id] = rles
            expressions.append(Expression(exp_id, text, tuple(sorted(set(obj_ids)))))
        return VideoRecord("mevis", video, names, height, width, expressions, frames, masks)

    return Source("mevis", split, list(videos), read, skip_bad)


def _object_rles(rles: Any, num_frames: int, height: int, width: int, where: str) -> list[dict[str, Any] | None]:
    """The per-frame RLEs of one object, checked; raises if it is absent or has no mask in any frame."""
    if rles is None:
        raise ConversionError(f"{where}: has no mask (anno_id not in mask_dict)")
    if not isinstance(rles, list) or len(rles) != num_frames:
        got = f"{len(rles)} entries" if isinstance(rles, list) else type(rles).__name__
        raise ConversionError(f"{where}: expected a list of {num_frames} RLEs or nulls (one per frame), got {got}")
    for index, rle in enumerate(rles):
        if rle is not None:
            check_rle(rle, height, width, f"{where} frame {index}")
    if all(rle is None for rle in rles):
        raise ConversionError(f"{where}: has no mask in any frame")
    return [dict(rle) if rle is not None else None for rle in rles]


# ---------------------------------------------------------------- Ref-YouTube-VOS and Ref-DAVIS17


def open_ref_youtube_vos(root: str | Path, split: str, min_frames: int, skip_bad: bool) -> Source:
    """``<root>/<split>/{JPEGImages,Annotations}/<video>/<frame>.{jpg,png}``, ``<root>/meta_expressions/<split>/meta_expressions.json``."""
    return _open_palette_layout("ref-youtube-vos", root, split, min_frames, skip_bad)


def open_ref_davis17(root: str | Path, split: str, min_frames: int, skip_bad: bool) -> Source:
    """Ref-DAVIS17 in the Ref-YouTube-VOS layout."""
    return _open_palette_layout("ref-davis17", root, split, min_frames, skip_bad)


def _open_palette_layout(dataset: str, root: str | Path, split: str, min_frames: int, skip_bad: bool) -> Source:
    split_dir = _split_dir(root, split)
    meta_path = Path(root) / "meta_expressions" / split / "meta_expressions.json"
    videos = meta_videos(meta_path)
    labelled = (split_dir / "Annotations").is_dir()

    def read(video: str) -> VideoRecord:
        where = f"{meta_path}: video {video!r}"
        names = frame_names(videos[video], where)
        items = expression_items(videos[video], where)
        masks: dict[int, list[dict[str, Any] | None]] = {}
        if labelled:
            annotation_dir = split_dir / "Annotations" / video
            names = [n for n in names if (annotation_dir / f"{n}.png").is_file()]
            if not names:
                raise ConversionError(f"{where}: no annotation PNG for any of its frames in {annotation_dir}")
        _check_length(len(names), min_frames, where)
        frames, height, width = _read_frames(split_dir / "JPEGImages" / video, names, where)
        if labelled:
            ids = np.stack([read_object_ids(annotation_dir / f"{n}.png", height, width) for n in names])
            for obj_id in (int(i) for i in np.unique(ids) if i != 0):
                masks[obj_id] = [encode_rle(frame == obj_id) for frame in ids]
        expressions = []
        for exp_id, exp in items:
            here = f"{where} expression {exp_id}"
            text = _text(exp, here)
            if not labelled:
                expressions.append(Expression(exp_id, text, ()))
                continue
            try:
                obj_id = int(exp["obj_id"])
            except (KeyError, TypeError, ValueError) as err:
                raise ConversionError(f"{here}: 'obj_id' must be an object id, got {exp.get('obj_id')!r}") from err
            if obj_id not in masks:
                raise ConversionError(f"{here} ({text!r}): object {obj_id} has no mask in any annotated frame of {annotation_dir}")
            expressions.append(Expression(exp_id, text, (obj_id,)))
        return VideoRecord(dataset, video, names, height, width, expressions, frames, masks)

    return Source(dataset, split, list(videos), read, skip_bad)


# ---------------------------------------------------------------- shared


def _split_dir(root: str | Path, split: str) -> Path:
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise ConversionError(f"{split_dir}: split directory not found (root {root}, split {split!r})")
    return split_dir


def _text(exp: dict[str, Any], where: str) -> str:
    text = exp.get("exp")
    if not isinstance(text, str) or not normalize_expression(text):
        raise ConversionError(f"{where}: 'exp' must be a non-empty string, got {text!r}")
    return normalize_expression(text)


def _read_frames(frame_dir: Path, names: list[str], where: str) -> tuple[list[bytes], int, int]:
    """The JPEG bytes of ``names`` and their common height and width."""
    frames: list[bytes] = []
    height = width = 0
    for name in names:
        path = frame_dir / f"{name}.jpg"
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ConversionError(f"{where}: frame file {path} is missing or unreadable ({err.strerror})") from err
        w, h = _image_size(data, path)
        if frames and (h, w) != (height, width):
            raise ConversionError(f"{path}: frame is {w}x{h}, the video's first frame is {width}x{height}")
        height, width = h, w
        frames.append(data)
    return frames, height, width


def _image_size(data: bytes, path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image, decoded at reduced scale to prove the whole file is readable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
            img.draft("RGB", (max(size[0] // 8, 1), max(size[1] // 8, 1)))
            img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ConversionError(f"{path}: not a readable image ({err})") from err
    return size


def _check_length(num_frames: int, min_frames: int, where: str) -> None:
    """Too short a video cannot fill a training sample; one without frames is never usable."""
    if num_frames < max(min_frames, 1):
        raise ConversionError(f"{where}: has {num_frames} usable frames, fewer than min_frames={min_frames}")


OPENERS: dict[str, Callable[[str | Path, str, int, bool], Source]] = {
    "mevis": open_mevis,
    "ref-youtube-vos": open_ref_youtube_vos,
    "ref-davis17": open_ref_davis17,
}

# Recorded in each prepared split's manifest with the options the converter ran with. Bump a converter's version when it
# writes different records from the same source (which frames, masks or text it keeps); the shard format itself is
# versioned apart (``records.SHARD_FORMAT_VERSION``).
CONVERTER_VERSIONS: dict[str, int] = {
    "mevis": 1,
    "ref-youtube-vos": 1,
    "ref-davis17": 1,
}
