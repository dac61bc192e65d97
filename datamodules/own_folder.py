"""``glus prepare folder``: your own videos, in a layout made by hand, into shards (``docs/own_data.md``).

Layout of ``--root DIR`` (one folder per split, e.g. ``my_videos/train`` and ``my_videos/val``)::

    DIR/expressions.json     {"<video>": [{"sentence": "the dog on the left", "object_ids": [1]}, ...], ...}
      or DIR/expressions.csv   header ``video,object_ids,sentence``; object_ids "1", "1 2" or "1;2"
    DIR/<video>/frames/<frame>.jpg|.jpeg|.png     the frames, in natural order of their names (2 before 10)
      or DIR/<video>.mp4, or DIR/<video>/video.mp4 (any of .mp4 .m4v .mov .avi .mkv .webm): frames 00000, 00001 ...
    DIR/<video>/masks/<object_id>/<frame>.png     one binary PNG per object and frame (nonzero = the object)
      or DIR/<video>/masks/<frame>.png            one ID PNG per frame (pixel value = object id, 0 = background)

Decisions, so that a shard means the same as one of an official dataset (:mod:`datamodules.converters`):

- Videos are those the expressions file names, in its order; ``exp_id`` is a sentence's position in its video's
  list (``"0"``, ``"1"`` ...), the folder ``glus predict --submission`` writes its masks to. Folders and video files of
  ``DIR`` that no expression names are left out (a note lists them).
- JPEG and PNG frames are stored as their source bytes, unchanged: PNG stays lossless (re-encoding as JPEG would
  change the pixels the masks were drawn on) and the shard readers decode frames by content (PIL), whatever the member
  is named. Frames of a video file are decoded (PyAV) and encoded as JPEG at quality ``JPEG_QUALITY``: they were
  lossy already, and PNG would make them about ten times larger.
- Sparse annotation: a labelled video (one with ``masks/``) keeps **only the frames that have a mask file**, as the
  Ref-YouTube-VOS converter does: a frame without one has an unknown mask, and storing it as empty would teach the
  model that the object is absent. With per-object folders, a frame counts as annotated when any object has its PNG;
  an object without a PNG there is absent from it. To keep a frame where no object shows, write an all-zero mask.
- A video without ``masks/`` is unlabelled: all its frames, no masks, for inference only; its sentences must name no
  objects. A split is all labelled or all unlabelled (an unlabelled video would train "absent" everywhere).
- Object ids are positive integers (0 is the background of ID PNGs). An object with no pixel in any kept frame is not
  stored; a sentence naming one is an error.
- Sentences are normalised as the official converters do (``normalize_expression``). The same sentence twice in a
  video: with the same objects the later copy is left out with a warning (it would count twice in J&F); with other
  objects it is an error (one sentence, two answers).

Faults of one video raise ``ConversionError`` naming the file, video and sentence; with ``skip_bad`` the video is
left out, counted and listed in the manifest (:class:`datamodules.converters.Source`). Faults of the split (no or
two expressions files, malformed JSON or CSV header, labelled and unlabelled videos mixed) always raise.

For ``glus evaluate``: :class:`GroundTruth` writes a labelled split's masks as MeViS ``mask_dict.json`` (COCO RLE per
object and kept frame) and ``meta_expressions.json`` (the kept frames, every sentence with its ``obj_id`` and
``anno_id``), into ``<out>/<split>/gt/``; the frame names and exp_ids are those of the shards, so the masks
``glus predict --submission`` writes for the split are scored frame by frame against them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from datamodules.converters import Source, check_length, normalize_expression
from datamodules.formats import ConversionError, load_json
from datamodules.records import Expression, VideoRecord, encode_rle, sample_key
from datamodules.video_files import VIDEO_SUFFIXES, video_file_frames, video_frame_name

DATASET = "folder"
CONVERTER_VERSION = 1  # bump when the same folder gives different records
EXPRESSION_FILES = ("expressions.json", "expressions.csv")
CSV_COLUMNS = ("video", "object_ids", "sentence")
JSON_KEYS = ("sentence", "object_ids")
FRAMES_DIR = "frames"
MASKS_DIR = "masks"
VIDEO_FILE_STEM = "video"  # DIR/<video>/video.mp4
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
JPEG_QUALITY = 95  # frames decoded from a video file
GT_DIR = "gt"
_DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # 16- and 32-bit single-channel images


@dataclass
class FolderSplit:
    """One ``--root`` folder opened for conversion: its ``Source`` and what the notes after conversion say."""

    source: Source
    root: Path
    expressions_file: Path
    unused: list[str]  # entries of root that no expression names
    unannotated: dict[str, tuple[int, int]] = field(default_factory=dict)  # video -> (frames left out, frames)

    def notes(self) -> list[str]:
        lines = []
        if self.unused:
            lines.append(f"note: {_count(len(self.unused), 'entry', 'entries')} of {self.root} named in no expression of "
                         f"{self.expressions_file.name} left out: {_some(self.unused)}")
        if self.unannotated:
            dropped = sum(n for n, _ in self.unannotated.values())
            total = sum(t for _, t in self.unannotated.values())
            lines.append(f"note: {dropped} of {total} frames of {_count(len(self.unannotated), 'labelled video')} "
                         f"({_some(list(self.unannotated))}) have no mask file and were left out: a frame without a mask is "
                         "unknown, not empty (write an all-zero mask to keep a frame where no object shows)")
        return lines


def open_folder(root: str | Path, split: str, min_frames: int, skip_bad: bool) -> FolderSplit:
    """The videos of ``root`` (see the module doc) as a ``Source`` of ``VideoRecord``s, read one video at a time."""
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"{root}: --root is not a folder")
    path, entries = read_expressions(root)
    keys: dict[str, str] = {}
    for video in entries:
        other = keys.setdefault(sample_key(DATASET, video), video)
        if other != video:  # the shard key replaces separators and dots: these two would be one sample
            raise ConversionError(f"{path}: videos {other!r} and {video!r} differ only in characters other than letters, "
                                  "digits, '_' and '-'; rename one")
    media = _root_entries(root)
    labelled = {video: (root / video / MASKS_DIR).exists() for video in entries if video in media}
    if len(set(labelled.values())) > 1:
        without = [video for video, has in labelled.items() if not has]
        raise ConversionError(
            f"{root}: {_count(len(without), 'video')} without a {MASKS_DIR}/ folder ({_some(without)}) beside "
            f"{len(labelled) - len(without)} with one; a split is all labelled (training, evaluation) or all unlabelled "
            "(inference only): add their masks or move them to a folder of their own"
        )
    unannotated: dict[str, tuple[int, int]] = {}

    def read(video: str) -> VideoRecord:
        return _read_video(root, video, entries[video], path, media.get(video, []), min_frames, unannotated)

    unused = sorted((name for name in media if name not in entries), key=natural_key)
    return FolderSplit(Source(DATASET, split, list(entries), read, skip_bad), root, path, unused, unannotated)


# ---------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Row:
    """One sentence as written in the expressions file, checked only when its video is read."""

    where: str  # file and position, for messages
    sentence: Any
    object_ids: Any  # JSON: a list (or absent: []); CSV: the cell's text
    problem: str | None = None  # a fault found while reading the file, raised with the video


def read_expressions(root: Path) -> tuple[Path, dict[str, list[Row] | Any]]:
    """The expressions file of ``root`` and its rows per video, in file order (a JSON video's raw value)."""
    found = [root / name for name in EXPRESSION_FILES if (root / name).is_file()]
    if len(found) != 1:
        what = "both " + " and ".join(str(p) for p in found) + "; keep one" if found else \
            f"no {' or '.join(EXPRESSION_FILES)} in {root}"
        raise ConversionError(f"{root}: {what} (docs/own_data.md describes them)")
    path = found[0]
    if path.suffix == ".json":
        data = load_json(path)
        if not isinstance(data, dict) or not data:
            raise ConversionError(f"{path}: expected a non-empty object "
                                  '{"<video>": [{"sentence": "...", "object_ids": [1, 2]}, ...]}, got ' + str(data)[:80])
        return path, dict(data)
    return path, _read_csv(path)


def _read_csv(path: Path) -> dict[str, list[Row]]:
    rows: dict[str, list[Row]] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark, as spreadsheets write
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            if sorted(columns) != sorted(CSV_COLUMNS):
                raise ConversionError(f"{path}: the header must name the columns {','.join(CSV_COLUMNS)} (any order), "
                                      f"got {','.join(columns) or 'nothing'}")
            reader.fieldnames = columns
            for raw in reader:
                where = f"{path} line {reader.line_num}"
                video = (raw.get("video") or "").strip()
                if not video:
                    raise ConversionError(f"{where}: no video name")
                problem = None
                if raw.get(None):  # more cells than the header: DictReader puts the rest under None
                    problem = "has more cells than the header: put a sentence that holds commas in double quotes"
                elif any(raw.get(c) is None for c in CSV_COLUMNS):
                    problem = f"has fewer cells than the header ({','.join(CSV_COLUMNS)})"
                rows.setdefault(video, []).append(Row(f"{where}: video {video!r}", raw.get("sentence"),
                                                      raw.get("object_ids") or "", problem))
    except (csv.Error, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: not a readable CSV file ({err})") from err
    if not rows:
        raise ConversionError(f"{path}: no rows below the header")
    return rows


def _json_rows(path: Path, video: str, value: Any) -> list[Row]:
    where = f"{path}: video {video!r}"
    if not isinstance(value, list) or not value:
        raise ConversionError(f'{where}: expected a non-empty list [{{"sentence": "...", "object_ids": [1]}}, ...], '
                              f"got {str(value)[:80]}")
    rows = []
    for i, item in enumerate(value):
        here = f"{where} expression {i}"
        if not isinstance(item, dict):
            raise ConversionError(f'{here}: expected an object {{"sentence": "...", "object_ids": [...]}}, got {str(item)[:80]}')
        unknown = sorted(set(item) - set(JSON_KEYS))
        if unknown:
            raise ConversionError(f"{here}: unknown keys {unknown}; an expression has {' and '.join(JSON_KEYS)}")
        rows.append(Row(here, item.get("sentence"), item.get("object_ids", [])))
    return rows


def _object_ids(row: Row) -> tuple[int, ...]:
    raw = row.object_ids
    if isinstance(raw, int) and not isinstance(raw, bool):
        tokens = [raw]
    elif isinstance(raw, str):
        tokens = [t for t in re.split(r"[;\s]+", raw.strip()) if t]
    elif isinstance(raw, list):
        tokens = raw
    else:
        tokens = None
    if tokens is None or not all((isinstance(t, int) and not isinstance(t, bool)) or (isinstance(t, str) and t.isdigit())
                                 for t in tokens):
        raise ConversionError(f"{row.where}: object_ids must be object ids (positive integers; in CSV separated by spaces "
                              f"or ';'), got {raw!r}")
    ids = [int(t) for t in tokens]
    if any(i < 1 for i in ids):
        raise ConversionError(f"{row.where}: object id 0 in {raw!r}: object ids start at 1 (0 is the background)")
    return tuple(sorted(set(ids)))


def _expressions(rows: list[Row], labelled: bool, where: str) -> list[Expression]:
    """Checked, normalised expressions of one video; exp_id is the position in the file's list for the video."""
    expressions: list[Expression] = []
    first: dict[str, tuple[Row, Expression]] = {}
    for i, row in enumerate(rows):
        if row.problem:
            raise ConversionError(f"{row.where} {row.problem}")
        text = normalize_expression(row.sentence) if isinstance(row.sentence, str) else ""
        if not text:
            raise ConversionError(f"{row.where}: the sentence must be a non-empty string, got {row.sentence!r}")
        obj_ids = _object_ids(row)
        here = f"{row.where} ({text!r})"
        if labelled and not obj_ids:
            raise ConversionError(f"{here}: names no object; every sentence of a video with {MASKS_DIR}/ needs its object ids")
        if not labelled and obj_ids:
            raise ConversionError(f"{here}: names objects {list(obj_ids)} but {where} has no {MASKS_DIR}/ folder: add the "
                                  "masks, or leave object_ids empty to use the video for inference only")
        expression = Expression(str(i), text, obj_ids)
        if text in first:
            earlier, kept = first[text]
            if kept.obj_ids != obj_ids:
                raise ConversionError(f"{here}: the same sentence as {earlier.where} names other objects "
                                      f"({list(obj_ids)} and {list(kept.obj_ids)}): one sentence, one answer")
            tqdm.write(f"warning: {here}: the same sentence and objects as {earlier.where}; left out", file=sys.stderr)
            continue
        first[text] = (row, expression)
        expressions.append(expression)
    return expressions


# ---------------------------------------------------------------- frames and masks


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key of names with numbers in them: ``frame2`` before ``frame10``; ties (``1``, ``01``) by the name itself."""
    parts = re.split(r"(\d+)", name)  # text, number, text, number ... : like types at like places
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _root_entries(root: Path) -> dict[str, list[Path]]:
    """Video name -> what ``root`` holds for it: its folder and/or its video file(s)."""
    media: dict[str, list[Path]] = {}
    for entry in sorted(filter(_visible, root.iterdir())):
        if entry.is_dir():
            media.setdefault(entry.name, []).append(entry)
        elif entry.suffix.lower() in VIDEO_SUFFIXES:
            media.setdefault(entry.stem, []).append(entry)
    return media


def _frame_source(root: Path, video: str, entries: list[Path], expressions_file: Path) -> Path:
    """``DIR/<video>/frames``, ``DIR/<video>/video.mp4`` or ``DIR/<video>.mp4``: exactly one of them."""
    folder = root / video
    if not entries:
        raise ConversionError(f"{expressions_file}: video {video!r}: no folder {folder}/ and no video file "
                              f"{folder}.mp4 in {root}; check the name")
    candidates = [p for p in entries if p.is_file()]
    if folder.is_dir():
        if (folder / FRAMES_DIR).is_dir():
            candidates.append(folder / FRAMES_DIR)
        candidates += [p for p in sorted(folder.iterdir())
                       if p.is_file() and p.stem == VIDEO_FILE_STEM and p.suffix.lower() in VIDEO_SUFFIXES]
    if len(candidates) > 1:
        raise ConversionError(f"video {video!r}: frames from {' and '.join(str(p) for p in candidates)}; keep one")
    if not candidates:
        loose = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
        hint = f"; the images in {folder}/ ({_some(loose)}) belong in {folder / FRAMES_DIR}/" if loose else ""
        raise ConversionError(f"video {video!r}: no frames: expected {folder / FRAMES_DIR}/*.jpg|*.jpeg|*.png, "
                              f"{folder / VIDEO_FILE_STEM}.mp4 or {folder}.mp4{hint}")
    return candidates[0]


def _frame_files(frames_dir: Path, video: str) -> dict[str, Path]:
    """Frame name (file stem) -> file, in natural order of the names."""
    files: dict[str, Path] = {}
    for path in sorted(filter(_visible, frames_dir.iterdir())):
        if not path.is_file() or path.suffix.lower() not in FRAME_SUFFIXES:
            raise ConversionError(f"video {video!r}: {path} is not a frame: {frames_dir}/ holds only "
                                  f"{', '.join(FRAME_SUFFIXES)} files (convert other formats to PNG)")
        if path.stem in files:
            raise ConversionError(f"video {video!r}: {files[path.stem].name} and {path.name} in {frames_dir}/ are the same frame")
        files[path.stem] = path
    if not files:
        raise ConversionError(f"video {video!r}: no frames: {frames_dir}/ holds no {', '.join(FRAME_SUFFIXES)} file")
    return {name: files[name] for name in sorted(files, key=natural_key)}


def _check_frame(data: bytes, path: Path, video: str) -> tuple[int, int]:
    """``(width, height)`` of a JPEG or PNG frame, decoded whole (JPEG at 1/8 scale: cheap) to prove it is readable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            kind, mode, size = img.format, img.mode, img.size
            if kind == "JPEG":
                img.draft("RGB", (max(size[0] // 8, 1), max(size[1] // 8, 1)))
            img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ConversionError(f"video {video!r}: {path}: not a readable image ({err})") from err
    if kind not in ("JPEG", "PNG"):
        raise ConversionError(f"video {video!r}: {path}: a {kind} image; frames must be JPEG or PNG")
    if mode in _DEEP_MODES:
        raise ConversionError(f"video {video!r}: {path}: a 16-bit (mode {mode}) image; frames must be 8-bit (the model reads "
                              "8-bit RGB)")
    return size


@dataclass
class Masks:
    """``DIR/<video>/masks``: per-object folders (``objects``) or ID PNGs (``ids``), each frame name -> file."""

    folder: Path
    objects: dict[int, dict[str, Path]] | None = None
    ids: dict[str, Path] | None = None

    @property
    def frames(self) -> dict[str, Path]:
        """Frame name -> one mask file of it: every frame that has a mask."""
        if self.ids is not None:
            return self.ids
        return {name: path for files in (self.objects or {}).values() for name, path in files.items()}


def _mask_files(folder: Path, video: str) -> Masks | None:
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise ConversionError(f"video {video!r}: {folder} is not a folder")
    entries = sorted(filter(_visible, folder.iterdir()))
    dirs = [p for p in entries if p.is_dir()]
    files = [p for p in entries if not p.is_dir()]
    if dirs and files:
        raise ConversionError(f"video {video!r}: {folder}/ mixes object folders ({dirs[0].name}/) and ID PNGs "
                              f"({files[0].name}); use one layout")
    if dirs:
        objects: dict[int, dict[str, Path]] = {}
        for d in dirs:
            if not d.name.isdigit() or int(d.name) < 1:
                raise ConversionError(f"video {video!r}: {d}/: an object folder is named by its object id, a positive "
                                      "integer (0 is the background)")
            if int(d.name) in objects:
                raise ConversionError(f"video {video!r}: {d}/ and another folder of {folder}/ are both object {int(d.name)}")
            objects[int(d.name)] = _png_files(d, video)
        masks = Masks(folder, objects=objects)
    else:
        masks = Masks(folder, ids=_png_files(folder, video))
    if not masks.frames:
        raise ConversionError(f"video {video!r}: {folder}/ holds no mask PNG (remove the folder for an unlabelled video)")
    return masks


def _png_files(folder: Path, video: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(filter(_visible, folder.iterdir())):
        if not path.is_file() or path.suffix.lower() != ".png":
            raise ConversionError(f"video {video!r}: {path}: masks must be PNG files (JPEG compression changes mask values)")
        files[path.stem] = path
    return files


def _read_mask(path: Path, height: int, width: int, video: str) -> np.ndarray:
    """The values of an 8-bit single-channel mask PNG (grayscale, palette indices or 1-bit), checked to be the frame's size."""
    try:
        with Image.open(path) as img:
            kind, mode = img.format, img.mode
            values = np.asarray(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ConversionError(f"video {video!r}: {path}: not a readable PNG ({err})") from err
    if kind != "PNG":
        raise ConversionError(f"video {video!r}: {path}: a {kind} file; masks must be PNG")
    if mode in _DEEP_MODES:
        raise ConversionError(f"video {video!r}: {path}: a 16-bit (mode {mode}) PNG; masks must be 8-bit grayscale or palette PNGs")
    if mode not in ("1", "L", "P"):
        raise ConversionError(f"video {video!r}: {path}: a mode {mode} PNG (colour or alpha); masks must be single-channel: "
                              "8-bit grayscale (L) or palette (P) PNGs whose values are 0 and the object (or object ids)")
    if values.shape != (height, width):
        raise ConversionError(f"video {video!r}: {path}: mask is {values.shape[1]}x{values.shape[0]}, its frame is {width}x{height}")
    return values.astype(np.uint8)


def _binary_mask(path: Path, height: int, width: int, video: str) -> np.ndarray:
    values = _read_mask(path, height, width, video)
    levels = np.unique(values)
    if np.count_nonzero(levels) > 1:
        shown = ", ".join(str(v) for v in levels[:8]) + (", ..." if len(levels) > 8 else "")
        raise ConversionError(f"video {video!r}: {path}: not a binary mask: values {shown}; one object's mask holds 0 and one other value "
                              "(anti-aliased or resized edges? save it with nearest-neighbour resampling)")
    return (values != 0).astype(np.uint8)


# ---------------------------------------------------------------- one video


def _read_video(root: Path, video: str, raw: Any, expressions_file: Path, entries: list[Path], min_frames: int,
                unannotated: dict[str, tuple[int, int]]) -> VideoRecord:
    where = f"video {video!r}"
    rows = raw if expressions_file.suffix == ".csv" else _json_rows(expressions_file, video, raw)
    source = _frame_source(root, video, entries, expressions_file)
    masks = _mask_files(root / video / MASKS_DIR, video)
    expressions = _expressions(rows, masks is not None, f"{root / video}")
    annotated = masks.frames if masks is not None else None
    if source.is_dir():
        files = _frame_files(source, video)
        if annotated is not None:
            _check_mask_names(annotated, list(files), source, video)
        names = [n for n in files if annotated is None or n in annotated]
        check_length(len(names), min_frames, f"{where} ({source})")
        frames, height, width = _read_frames([files[n] for n in names], video)
        total = len(files)
    else:
        names, frames, height, width, total = _decode_video_file(source, annotated, video)
        if annotated is not None:
            _check_mask_names(annotated, names, source, video, decoded=total)
        check_length(len(names), min_frames, f"{where} ({source})")
    objects = _object_masks(masks, names, height, width, video) if masks is not None else {}
    for expression, row in zip(expressions, (rows[int(e.exp_id)] for e in expressions), strict=True):
        absent = [o for o in expression.obj_ids if o not in objects]
        if absent:
            have = f"objects with a mask: {sorted(objects)}" if objects else "no object has a mask"
            raise ConversionError(f"{row.where} ({expression.text!r}): object {absent[0]} has no mask in any frame of "
                                  f"{masks.folder if masks else root / video} ({have})")
    if annotated is not None and len(names) < total:
        unannotated[video] = (total - len(names), total)
    return VideoRecord(DATASET, video, names, height, width, expressions, frames, objects)


def _check_mask_names(annotated: dict[str, Path], names: list[str], source: Path, video: str, decoded: int | None = None) -> None:
    """Every mask file names a frame: a mask ``0.png`` beside frames ``00000.jpg`` is a naming mistake, not a frame."""
    known = set(names) if decoded is None else {video_frame_name(i) for i in range(decoded)}
    stray = [path for name, path in annotated.items() if name not in known]
    if stray:
        if decoded is None:
            frames = f"the frames in {source}/ are named {names[0]} ... {names[-1]}" if names else f"{source}/ has no frames"
        else:
            frames = f"{source} has {decoded} frames, named {video_frame_name(0)} ... {video_frame_name(max(decoded - 1, 0))}"
        raise ConversionError(f"video {video!r}: mask {stray[0]} has no frame {stray[0].stem!r} ({frames}); a mask is named "
                              "as its frame's file, with .png")


def _read_frames(files: list[Path], video: str) -> tuple[list[bytes], int, int]:
    """The bytes of each frame file, unchanged, and their common height and width."""
    frames: list[bytes] = []
    height = width = 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ConversionError(f"video {video!r}: frame file {path} is unreadable ({err.strerror})") from err
        w, h = _check_frame(data, path, video)
        if frames and (h, w) != (height, width):
            raise ConversionError(f"video {video!r}: {path}: frame is {w}x{h}, the video's first frame {files[0].name} "
                                  f"is {width}x{height}")
        height, width = h, w
        frames.append(data)
    return frames, height, width


def _decode_video_file(path: Path, annotated: dict[str, Path] | None, video: str) -> tuple[list[str], list[bytes], int, int, int]:
    """Frame names, JPEG bytes, height and width of the frames kept (all, or those with a mask) and the frame count."""
    names: list[str] = []
    frames: list[bytes] = []
    height = width = total = 0
    try:
        for index, frame in enumerate(video_file_frames(path)):
            total = index + 1
            name = video_frame_name(index)
            if annotated is not None and name not in annotated:
                continue
            if frames and frame.shape[:2] != (height, width):
                raise ConversionError(f"video {video!r}: {path}: frame {name} is {frame.shape[1]}x{frame.shape[0]}, "
                                      f"the first frame kept is {width}x{height}")
            height, width = frame.shape[:2]
            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, format="JPEG", quality=JPEG_QUALITY)
            names.append(name)
            frames.append(buffer.getvalue())
    except ValueError as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(f"video {video!r}: {err}") from err
    if total == 0:
        raise ConversionError(f"video {video!r}: {path}: the video has no frames")
    return names, frames, height, width, total


def _object_masks(masks: Masks, names: list[str], height: int, width: int, video: str) -> dict[int, list[dict[str, Any] | None]]:
    """Object id -> COCO RLE (or None where absent) per kept frame; objects with no pixel in any of them are left out."""
    objects: dict[int, list[dict[str, Any] | None]] = {}
    if masks.objects is not None:
        for obj_id, files in sorted(masks.objects.items()):
            rles = [encode_rle(_binary_mask(files[n], height, width, video)) if n in files else None for n in names]
            if any(rle is not None for rle in rles):
                objects[obj_id] = rles
        return objects
    for t, name in enumerate(names):  # one frame's ids at a time: never the whole video's masks at once
        ids = _read_mask((masks.ids or {})[name], height, width, video)
        for obj_id in (int(i) for i in np.unique(ids) if i != 0):
            objects.setdefault(obj_id, [None] * len(names))[t] = encode_rle(ids == obj_id)
    return dict(sorted(objects.items()))


# ---------------------------------------------------------------- ground truth for glus evaluate


class GroundTruth:
    """MeViS-style ``mask_dict.json`` + ``meta_expressions.json`` of the labelled records that pass through ``collect``."""

    def __init__(self) -> None:
        self.videos: dict[str, dict[str, Any]] = {}
        self.mask_dict: dict[str, list[dict[str, Any] | None]] = {}

    def collect(self, records: Iterator[VideoRecord]) -> Iterator[VideoRecord]:
        for record in records:
            if record.masks:
                self.add(record)
            yield record

    def add(self, record: VideoRecord) -> None:
        anno: dict[int, str] = {}
        for obj_id in sorted({o for e in record.expressions for o in e.obj_ids}):
            anno[obj_id] = str(len(self.mask_dict))  # MeViS anno_ids: integers, unique over the split
            self.mask_dict[anno[obj_id]] = record.masks[obj_id]
        self.videos[record.video] = {
            "frames": list(record.frame_names),
            "expressions": {e.exp_id: {"exp": e.text, "obj_id": list(e.obj_ids), "anno_id": [anno[o] for o in e.obj_ids]}
                            for e in record.expressions},
        }

    def write(self, folder: Path) -> Path:
        """``folder/mask_dict.json`` and ``folder/meta_expressions.json``, each written whole, then renamed into place."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in (("mask_dict.json", self.mask_dict), ("meta_expressions.json", {"videos": self.videos})):
            tmp = folder / f".{name}.tmp"
            tmp.write_text(json.dumps(data))
            os.replace(tmp, folder / name)
        return folder


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _some(names: list[str], shown: int = 5) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f", ... ({more} more)" if more > 0 else "")
