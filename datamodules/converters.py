"""Readers of the official MeViS, Ref-YouTube-VOS, Ref-DAVIS17, ReVOS and LV-VIS layouts that yield ``VideoRecord``s.

Decisions, so that a shard always means the same thing:

- Frames are the source JPEG bytes, unchanged. Each is decoded once at 1/8 scale (cheap) to catch
  unreadable or truncated files at conversion time rather than in the middle of training.
- MeViS: an expression's ``obj_id[i]`` has the mask ``mask_dict[anno_id[i]]``; masks are stored
  per object id, the RLE copied as is (a round trip is bit-identical) after checking that it
  decodes to the frame size.
- ReVOS (``<root>/{JPEGImages/<video>/, mask_dict.json, meta_expressions_<split>_.json}``, one root for
  every split): the MeViS format at other paths, read by the same code. An expression's target is the union
  of its ``anno_id`` masks, as the ReVOS evaluation scores it (``type_id`` is not read). ReVOS has expressions
  without a target: one with no ``anno_id``, or only objects null in every frame, is kept with no object ids,
  so it trains against the empty mask in every frame (what it should answer; the references train on it too).
  Objects null in every frame are left out of ``obj_ids``; the manifest counts the expressions kept without a
  target (``no_target_expressions``). In MeViS the same is an error.
- LV-VIS, one of two layouts, checked in this order:
  the VISA conversion that GLUS trains on (``<root>/<split>/{JPEGImages, meta_expressions.json,
  mask_dict.json}``, read as MeViS, ``_`` of the category names in the text read as spaces), else the
  official YouTube-VIS-format one (``<root>/<split>/JPEGImages/<video>/<frame>.jpg`` and
  ``<split>_instances.json`` in ``<root>/<split>/`` or ``<root>/``): there a video's expressions are the
  categories present in it, the text the category name (``_`` as spaces), the objects every instance of
  that category (annotation ids, so the referent of "dog" is every dog), exp_id the category id. Its
  RLEs may have uncompressed (list) counts: they are stored compressed, the same masks. The manifest's
  converter options record which layout was read (``layout``).
- Ref-YouTube-VOS / Ref-DAVIS17: masks are ``png == obj_id`` of the palette PNGs. Where a labelled
  split annotates only some frames (Ref-YouTube-VOS train: every 5th), a record keeps **only the
  annotated frames**: a frame without a PNG has an unknown mask, and storing it as empty would
  teach the model that the object is absent.
- Unlabelled splits (MeViS or ReVOS without ``mask_dict.json``, e.g. MeViS valid; Ref-YouTube-VOS without
  ``Annotations/``) give records with every frame, no masks, and expressions with no object ids
  (they are for inference only); no mask check applies to them. An official LV-VIS split without
  ``annotations`` has no expressions and is refused.
- Expression text is normalised: whitespace collapsed and stripped, lower-cased, trailing
  periods dropped.

Faults of one video (missing or unreadable frame, malformed RLE or metadata entry or annotation, an
expression whose object has no mask in any frame, fewer than ``min_frames`` frames) raise a
``ConversionError`` naming the file, video and expression or annotation; with ``skip_bad`` the video is left
out, a line saying why goes to stderr and ``{"video", "reason"}`` is added to ``Source.skipped``.
Faults of a whole split (its metadata file missing or not valid JSON, an LV-VIS annotation of no video)
always raise: nothing of it could be converted.

The checked readers of the metadata, RLE and PNG formats are shared with ``glus evaluate`` and live in
:mod:`datamodules.formats`.
"""

from __future__ import annotations

import io
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask
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
    no_target: list[str] = field(default_factory=list)  # "<video>/<exp_id>" of expressions kept with an empty target
    layout: str | None = None  # which of a dataset's layouts was read, where it has several (LV-VIS)

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
    return _open_meta_layout("mevis", split, split_dir / "JPEGImages", split_dir / "meta_expressions.json",
                             split_dir / "mask_dict.json", min_frames, skip_bad)


def _open_meta_layout(dataset: str, split: str, frame_dir: Path, meta_path: Path, mask_path: Path, min_frames: int,
                      skip_bad: bool, underscores: bool = False, no_target: bool = False) -> Source:
    """The MeViS format at any paths (MeViS, ReVOS, LV-VIS as VISA converted it); without ``mask_path`` the split is
    unlabelled. ``underscores``: ``_`` in the text are spaces (LV-VIS category names). ``no_target``: an expression
    may have no object with a mask (ReVOS), kept with no object ids instead of raising."""
    videos = meta_videos(meta_path)
    mask_dict = load_json(mask_path) if mask_path.is_file() else None
    if mask_dict is not None and not isinstance(mask_dict, dict):
        raise ConversionError(f"{mask_path}: expected an object {{anno_id: [RLE or null per frame]}}, got {type(mask_dict).__name__}")
    no_targets: list[str] = []

    def read(video: str) -> VideoRecord:
        where = f"{meta_path}: video {video!r}"
        names = frame_names(videos[video], where)
        check_length(len(names), min_frames, where)
        frames, height, width = _read_frames(frame_dir / video, names, where)
        masks: dict[int, list[dict[str, Any] | None]] = {}
        checked: dict[str, list[dict[str, Any] | None]] = {}  # anno_id -> its RLEs, checked once per video
        expressions, empty = [], []
        for exp_id, exp in expression_items(videos[video], where):
            text = _text(exp, f"{where} expression {exp_id}", underscores)
            if mask_dict is None:
                expressions.append(Expression(exp_id, text, ()))
                continue
            obj_ids = [int(i) for i in id_list(exp, "obj_id", f"{where} expression {exp_id}", allow_empty=no_target)]
            anno_ids = id_list(exp, "anno_id", f"{where} expression {exp_id}", allow_empty=no_target)
            if len(obj_ids) != len(anno_ids):
                raise ConversionError(f"{where} expression {exp_id}: obj_id {obj_ids} and anno_id {anno_ids} differ in length")
            visible = set()
            for obj_id, anno_id in zip(obj_ids, anno_ids):
                here = f"{where} expression {exp_id} ({text!r}) object {obj_id} (anno_id {anno_id}, {mask_path.name})"
                if anno_id not in checked:
                    checked[anno_id] = _object_rles(mask_dict.get(anno_id), len(names), height, width, here, allow_empty=no_target)
                rles = checked[anno_id]
                if all(rle is None for rle in rles):
                    continue  # absent from the whole video (only with no_target): adds nothing to the target
                if obj_id in masks and masks[obj_id] != rles:
                    raise ConversionError(f"{here}: masks differ from those of another anno_id of the same object")
                masks[obj_id] = rles
                visible.add(obj_id)
            if not visible:
                empty.append(f"{video}/{exp_id}")
            expressions.append(Expression(exp_id, text, tuple(sorted(visible))))
        no_targets.extend(empty)  # only once the whole video is read: a skipped video counts none
        return VideoRecord(dataset, video, names, height, width, expressions, frames, masks)

    return Source(dataset, split, list(videos), read, skip_bad, no_target=no_targets)


def _object_rles(rles: Any, num_frames: int, height: int, width: int, where: str, allow_empty: bool = False,
                 missing: str = "anno_id not in mask_dict") -> list[dict[str, Any] | None]:
    """The per-frame RLEs of one object, checked; raises if it is absent or (unless ``allow_empty``) has no mask in any frame."""
    if rles is None:
        raise ConversionError(f"{where}: has no mask ({missing})")
    if not isinstance(rles, list) or len(rles) != num_frames:
        got = f"{len(rles)} entries" if isinstance(rles, list) else type(rles).__name__
        raise ConversionError(f"{where}: expected a list of {num_frames} RLEs or nulls (one per frame), got {got}")
    for index, rle in enumerate(rles):
        if rle is not None:
            check_rle(rle, height, width, f"{where} frame {index}")
    if not allow_empty and all(rle is None for rle in rles):
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
        check_length(len(names), min_frames, where)
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


# ---------------------------------------------------------------- ReVOS


def open_revos(root: str | Path, split: str, min_frames: int, skip_bad: bool) -> Source:
    """``<root>/{JPEGImages/<video>/<frame>.jpg, mask_dict.json, meta_expressions_<split>_.json}`` (all splits in one root)."""
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"{root}: dataset root not found")
    meta_path = root / f"meta_expressions_{split}_.json"  # the trailing underscore is in the released names
    if not meta_path.is_file() and (root / f"meta_expressions_{split}.json").is_file():
        meta_path = root / f"meta_expressions_{split}.json"
    return _open_meta_layout("revos", split, root / "JPEGImages", meta_path, root / "mask_dict.json", min_frames, skip_bad,
                             no_target=True)


# ---------------------------------------------------------------- LV-VIS


def open_lv_vis(root: str | Path, split: str, min_frames: int, skip_bad: bool) -> Source:
    """VISA's conversion ``<root>/<split>/{JPEGImages, meta_expressions.json, mask_dict.json}`` if there (what GLUS
    trains on), else the official ``<root>/<split>/JPEGImages`` with ``<split>_instances.json`` (see the module doc)."""
    split_dir = _split_dir(root, split)
    if (split_dir / "meta_expressions.json").is_file():
        source = _open_meta_layout("lv-vis", split, split_dir / "JPEGImages", split_dir / "meta_expressions.json",
                                   split_dir / "mask_dict.json", min_frames, skip_bad, underscores=True)
        source.layout = "visa"
        return source
    for instances in (split_dir / f"{split}_instances.json", Path(root) / f"{split}_instances.json"):
        if instances.is_file():
            return _open_youtube_vis("lv-vis", split, split_dir / "JPEGImages", instances, min_frames, skip_bad)
    raise ConversionError(f"{split_dir}: neither meta_expressions.json (VISA's conversion) nor {split}_instances.json "
                          f"(here or in {root}) found")


def _open_youtube_vis(dataset: str, split: str, frame_dir: Path, path: Path, min_frames: int, skip_bad: bool) -> Source:
    """A YouTube-VIS-format instances file: one expression per category present in a video, of all its instances."""
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("videos"), list) or not isinstance(data.get("categories"), list):
        raise ConversionError(f"{path}: expected an object {{'videos': [...], 'annotations': [...], 'categories': [...]}} "
                              "(YouTube-VIS format)")
    if not isinstance(data.get("annotations"), list):
        raise ConversionError(f"{path}: 'annotations' must be a list; a split without annotations has no category present "
                              "in a video, so nothing to refer to")
    categories: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str) or not cat["name"].strip():
            raise ConversionError(f"{path}: categories[{i}] must have an integer 'id' and a non-empty 'name', got {str(cat)[:80]}")
        categories[cat["id"]] = cat["name"]
    entries: dict[str, dict[str, Any]] = {}
    by_id: dict[int, str] = {}
    for i, entry in enumerate(data["videos"]):
        if not isinstance(entry, dict) or not _is_int(entry.get("id")) or entry["id"] in by_id:
            raise ConversionError(f"{path}: videos[{i}] must have an integer 'id' of its own, got {str(entry)[:80]}")
        name = _vis_video_name(entry) or f"video id {entry['id']}"  # a bad entry is named by id, and fails in read()
        if name in entries:
            raise ConversionError(f"{path}: videos[{i}] (id {entry['id']}): a second video in folder {name!r}")
        entries[name], by_id[entry["id"]] = entry, name
    annotations: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        video_id = ann.get("video_id") if isinstance(ann, dict) else None
        if not _is_int(video_id) or video_id not in by_id:
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            raise ConversionError(f"{path}: annotations[{i}] (id {ann_id!r}): 'video_id' {video_id!r} is not the id of a video")
        annotations[by_id[video_id]].append(ann)

    def read(video: str) -> VideoRecord:
        entry = entries[video]
        where = f"{path}: video {video!r} (id {entry['id']})"
        names = _vis_frame_names(entry, video, where)
        check_length(len(names), min_frames, where)
        frames, height, width = _read_frames(frame_dir / video, names, where)
        if not annotations[video]:
            raise ConversionError(f"{where}: has no annotation, so no category to refer to")
        masks: dict[int, list[dict[str, Any] | None]] = {}
        by_category: dict[int, list[int]] = defaultdict(list)
        for ann in annotations[video]:
            ann_id, category = ann.get("id"), ann.get("category_id")
            here = f"{where} annotation {ann_id!r}"
            if not _is_int(ann_id) or ann_id in masks:
                raise ConversionError(f"{here}: 'id' must be an integer of its own within the video")
            if not _is_int(category) or category not in categories:
                raise ConversionError(f"{here}: 'category_id' {category!r} is not a category of {path.name}")
            here = f"{here} (category {categories[category]!r}) segmentations"
            rles = _object_rles(ann.get("segmentations"), len(names), height, width, here, missing="no 'segmentations'")
            masks[ann_id] = [_compressed(rle) if rle is not None else None for rle in rles]
            by_category[category].append(ann_id)
        expressions = [Expression(str(category), _text({"exp": categories[category]}, f"{path}: category {category}", True),
                                  tuple(sorted(ids))) for category, ids in sorted(by_category.items())]
        return VideoRecord(dataset, video, names, height, width, expressions, frames, masks)

    return Source(dataset, split, list(entries), read, skip_bad, layout="official")


def _vis_video_name(entry: dict[str, Any]) -> str | None:
    """The folder of a video's frames under ``JPEGImages`` (that of its first file name), if it has one."""
    files = entry.get("file_names")
    if isinstance(files, list) and files and isinstance(files[0], str):
        folder = str(PurePosixPath(files[0]).parent)
        return folder if folder != "." else None
    return None


def _vis_frame_names(entry: dict[str, Any], video: str, where: str) -> list[str]:
    """Frame names (file names without folder and ``.jpg``); every file must be ``<video>/<frame>.jpg``."""
    files = entry.get("file_names")
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise ConversionError(f"{where}: 'file_names' must be a non-empty list of '<video>/<frame>.jpg', got {str(files)[:80]}")
    names = []
    for file in files:
        path = PurePosixPath(file)
        if str(path.parent) != video or path.suffix != ".jpg":
            raise ConversionError(f"{where}: file name {file!r} is not '{video}/<frame>.jpg'")
        names.append(path.stem)
    if entry.get("length", len(names)) != len(names):
        raise ConversionError(f"{where}: 'length' is {entry['length']!r} but it has {len(names)} file_names")
    return names


def _compressed(rle: dict[str, Any]) -> dict[str, Any]:
    """A checked RLE with string counts (the shard format's), converted from list counts when needed: the same mask."""
    if not isinstance(rle["counts"], list):
        return rle
    height, width = (int(s) for s in rle["size"])
    out = coco_mask.frPyObjects({"size": [height, width], "counts": rle["counts"]}, height, width)
    return {"size": [height, width], "counts": out["counts"].decode("ascii")}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------- shared


def _split_dir(root: str | Path, split: str) -> Path:
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise ConversionError(f"{split_dir}: split directory not found (root {root}, split {split!r})")
    return split_dir


def _text(exp: dict[str, Any], where: str, underscores: bool = False) -> str:
    text = exp.get("exp")
    if isinstance(text, str) and underscores:
        text = text.replace("_", " ")
    if not isinstance(text, str) or not normalize_expression(text):
        raise ConversionError(f"{where}: 'exp' must be a non-empty string, got {exp.get('exp')!r}")
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


def check_length(num_frames: int, min_frames: int, where: str) -> None:
    """Too short a video cannot fill a training sample; one without frames is never usable."""
    if num_frames < max(min_frames, 1):
        raise ConversionError(f"{where}: has {num_frames} usable frames, fewer than min_frames={min_frames}")


OPENERS: dict[str, Callable[[str | Path, str, int, bool], Source]] = {
    "mevis": open_mevis,
    "ref-youtube-vos": open_ref_youtube_vos,
    "ref-davis17": open_ref_davis17,
    "revos": open_revos,
    "lv-vis": open_lv_vis,
}

# Recorded in each prepared split's manifest with the options the converter ran with. Bump a converter's version when it
# writes different records from the same source (which frames, masks or text it keeps); the shard format itself is
# versioned apart (``records.SHARD_FORMAT_VERSION``).
CONVERTER_VERSIONS: dict[str, int] = {
    "mevis": 1,
    "ref-youtube-vos": 1,
    "ref-davis17": 1,
    "revos": 1,
    "lv-vis": 1,
}
