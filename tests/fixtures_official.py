"""Tiny datasets in the official layouts, written into a temporary directory for tests.

``write_tiny_mevis`` uses synthetic videos (``write_mevis_layout``) with raw-looking expression text;
``write_tiny_ref_youtube_vos``, ``write_tiny_revos`` and ``write_tiny_lv_vis`` (official YouTube-VIS layout,
or VISA's conversion) draw their own frames and masks, independent of the synthetic generator. Each returns
the dataset root to pass to the converters (``open_*``/``prepare_official``).
Import as ``from fixtures_official import ...`` (pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from datamodules.synthetic import generate_video, write_mevis_layout

# DAVIS-style palette: index 0 black, then distinct colours (index i shows object i)
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128] + [255] * (3 * 250)


def raw_text(text: str, index: int) -> str:
    """How an annotator might have typed ``text``: odd case, doubled spaces, a trailing period."""
    styles = (f"  {text.upper()}.", f"{text.capitalize()} . ", f" {text.replace(' ', '  ', 1)}.\n")
    return styles[index % len(styles)]


def write_tiny_mevis(root: Path, split: str = "train", num_videos: int = 3, frames: int = 6, size: int = 48, seed: int = 0) -> Path:
    """A MeViS-layout split under ``root/split`` made of synthetic videos; returns ``root``."""
    records = []
    for index in range(num_videos):
        record = generate_video(seed, "train", index, frames, size).record
        record.expressions = [replace(e, text=raw_text(e.text, i)) for i, e in enumerate(record.expressions)]
        records.append(record)
    write_mevis_layout(records, root, split)
    return Path(root)


def write_tiny_ref_youtube_vos(
    root: Path,
    split: str = "train",
    num_videos: int = 3,
    frames: int = 11,
    height: int = 40,
    width: int = 56,
    annotate_every: int = 1,
    labelled: bool = True,
    seed: int = 0,
) -> Path:
    """A Ref-YouTube-VOS-layout split (also Ref-DAVIS17's); returns ``root``.

    Video ``v`` has objects 1 and 2 (sliding boxes, 2 drawn over 1) and, in odd videos, object 3,
    which appears only from the middle frame on. Frames are named like YouTube-VOS (``00000``,
    ``00005``, ...); annotation PNGs exist for every ``annotate_every``-th frame, none if not ``labelled``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    videos = {}
    for v in range(num_videos):
        video = f"vid{v:03d}"
        names = [f"{5 * t:05d}" for t in range(frames)]
        objects = [1, 2, 3] if v % 2 else [1, 2]
        jpeg_dir = root / split / "JPEGImages" / video
        png_dir = root / split / "Annotations" / video
        jpeg_dir.mkdir(parents=True)
        if labelled:
            png_dir.mkdir(parents=True)
        for t, name in enumerate(names):
            ids = np.zeros((height, width), dtype=np.uint8)
            for obj in objects:
                if obj == 3 and t < frames // 2:
                    continue
                top, left = 3 + 9 * (obj - 1), 2 + t + 6 * (obj - 1) + v
                ids[top : top + 14, left : left + 18] = obj
            image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
            image[ids > 0] = np.array(PALETTE, dtype=np.uint8).reshape(-1, 3)[ids[ids > 0]] + 100
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "JPEG", quality=90)
            (jpeg_dir / f"{name}.jpg").write_bytes(buffer.getvalue())
            if labelled and t % annotate_every == 0:
                png = Image.frombytes("P", (width, height), ids.tobytes())
                png.putpalette(PALETTE)
                png.save(png_dir / f"{name}.png")
        expressions = {str(i): {"exp": raw_text(f"the box number {obj} in video {v}", i), "obj_id": str(obj)} for i, obj in enumerate(objects)}
        videos[video] = {"frames": names, "expressions": expressions}
    meta_dir = root / "meta_expressions" / split
    meta_dir.mkdir(parents=True)
    (meta_dir / "meta_expressions.json").write_text(json.dumps({"videos": videos}, indent=1))
    return root


def _boxes_video(rng: np.random.Generator, v: int, frames: int, height: int, width: int, objects: dict[int, int]
                 ) -> tuple[list[bytes], dict[int, list[np.ndarray]]]:
    """JPEG frames and per-object masks of sliding boxes; ``objects[obj]`` is the first frame it is in (later ones drawn over)."""
    jpegs, masks = [], {obj: [] for obj in objects}
    for t in range(frames):
        ids = np.zeros((height, width), dtype=np.uint8)
        for obj, first in objects.items():
            if t >= first:
                top, left = (3 + 9 * (obj - 1)) % (height - 10), (2 + t + 6 * (obj - 1) + v) % (width - 12)
                ids[top : top + 14, left : left + 18] = obj
        for obj in objects:
            masks[obj].append((ids == obj).astype(np.uint8))
        image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
        image[ids > 0] = np.array(PALETTE, dtype=np.uint8).reshape(-1, 3)[ids[ids > 0]] + 100
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs, masks


def compressed_rle(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO RLE with list counts (as YouTube-VIS writes them): run lengths in column-major order, from a run of 0s."""
    flat = mask.flatten(order="F")
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))
    runs = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": runs if flat[0] == 0 else [0, *runs]}


def revos_video_name(split: str, v: int) -> str:
    return f"{'UVO/all' if v % 2 else 'MOSE'}/{split}{v:03d}"  # ReVOS names hold slashes: sub-folders of JPEGImages


def write_tiny_revos(root: Path, splits: dict[str, int] | None = None, frames: int = 6, height: int = 40, width: int = 56,
                     seed: int = 0) -> Path:
    """A ReVOS-layout root with ``splits`` (name -> videos; default train 3, valid 2) sharing one ``mask_dict.json``.

    Video ``v`` has boxes 1 and 2, in odd videos box 3 from the middle frame on, and object 4 with a null mask in
    every frame. Expressions: 0 referring (box 1), 1 reasoning (boxes 1, 2), 2 no target with empty id lists,
    3 no target through object 4 only; odd videos also 4 (box 3) and 5 (boxes 1 and 4: box 1's target).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    mask_dict: dict[str, list] = {}
    foreground: dict[str, dict] = {}
    vid_id = 0
    for split, count in (splits or {"train": 3, "valid": 2}).items():
        videos = {}
        for v in range(count):
            video = revos_video_name(split, v)
            names = [f"{t:05d}" for t in range(frames)]
            jpegs, masks = _boxes_video(rng, v, frames, height, width, {1: 0, 2: 0, **({3: frames // 2} if v % 2 else {})})
            (root / "JPEGImages" / video).mkdir(parents=True)
            for name, data in zip(names, jpegs):
                (root / "JPEGImages" / video / f"{name}.jpg").write_bytes(data)
            anno = {obj: str(1000 + 10 * vid_id + obj) for obj in (1, 2, 3, 4)}
            for obj, per_frame in masks.items():
                mask_dict[anno[obj]] = [compressed_rle(m) if m.any() else None for m in per_frame]
            mask_dict[anno[4]] = [None] * frames
            union = [np.maximum.reduce([m[t] for m in masks.values()]) for t in range(frames)]
            foreground[video] = {"masks_rle": [compressed_rle(u) for u in union], "foreground_ratio": [float(u.mean()) for u in union]}
            expressions = {
                "0": {"exp": raw_text(f"the box number 1 in video {v}", 0), "obj_id": [1], "anno_id": [anno[1]], "type_id": 0},
                "1": {"exp": "Which boxes would a cat chase?", "obj_id": [1, 2], "anno_id": [anno[1], anno[2]], "type_id": 1},
                "2": {"exp": "the purple elephant", "obj_id": [], "anno_id": [], "type_id": 2},
                "3": {"exp": raw_text("the box that never shows", 1), "obj_id": [4], "anno_id": [anno[4]], "type_id": 2},
            }
            if v % 2:
                expressions["4"] = {"exp": "the late box", "obj_id": [3], "anno_id": [anno[3]], "type_id": 0}
                expressions["5"] = {"exp": "the first box or the hidden one", "obj_id": [1, 4], "anno_id": [anno[1], anno[4]],
                                    "type_id": 0}
            videos[video] = {"vid_id": vid_id, "height": height, "width": width, "frames": names, "expressions": expressions}
            vid_id += 1
        (root / f"meta_expressions_{split}_.json").write_text(json.dumps({"videos": videos}))
    (root / "mask_dict.json").write_text(json.dumps(mask_dict))
    (root / "mask_dict_foreground.json").write_text(json.dumps(foreground))
    return root


LV_VIS_CATEGORIES = [{"id": 1, "name": "aerosol_can"}, {"id": 7, "name": "dog"}, {"id": 3, "name": "bow_(weapon)"},
                     {"id": 9, "name": "zebra"}]


def write_tiny_lv_vis(root: Path, split: str = "train", num_videos: int = 3, frames: int = 5, height: int = 40, width: int = 56,
                      at_root: bool = False, visa: bool = False, official: bool = True, seed: int = 0) -> Path:
    """An LV-VIS split in the official YouTube-VIS layout (``<split>_instances.json`` in ``root/split`` or, with ``at_root``,
    in ``root``) and/or, with ``visa``, VISA's conversion (``root/split/{meta_expressions,mask_dict}.json``).

    Video ``v`` (folder ``0000v``, id ``10 + v``) has two dogs and an aerosol can, odd ones also a bow from the middle
    frame on (null before); instances alternate between list (uncompressed) and string RLE counts.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    videos, annotations, ann_id = [], [], 1
    for v in range(num_videos):
        folder = f"{v:05d}"
        instances = {1: 7, 2: 7, 3: 1, **({4: 3} if v % 2 else {})}  # box -> category id
        jpegs, masks = _boxes_video(rng, v, frames, height, width, {1: 0, 2: 0, 3: 0, **({4: frames // 2} if v % 2 else {})})
        (root / split / "JPEGImages" / folder).mkdir(parents=True)
        for t, data in enumerate(jpegs):
            (root / split / "JPEGImages" / folder / f"{t:05d}.jpg").write_bytes(data)
        videos.append({"id": 10 + v, "width": width, "height": height, "length": frames,
                       "file_names": [f"{folder}/{t:05d}.jpg" for t in range(frames)]})
        for k, (box, category) in enumerate(instances.items()):
            encode = uncompressed_rle if k % 2 == 0 else compressed_rle
            segmentations = [encode(m) if m.any() else None for m in masks[box]]
            annotations.append({"id": ann_id, "video_id": 10 + v, "category_id": category, "iscrowd": 0,
                                "segmentations": segmentations, "areas": [int(m.sum()) if m.any() else None for m in masks[box]],
                                "bboxes": [None] * frames})
            ann_id += 1
    data = {"info": {}, "licenses": [], "videos": videos, "annotations": annotations, "categories": LV_VIS_CATEGORIES}
    instances_path = (root if at_root else root / split) / f"{split}_instances.json"
    if official:
        instances_path.write_text(json.dumps(data))
    if visa:
        names = {c["id"]: c["name"] for c in LV_VIS_CATEGORIES}
        meta, mask_dict = {}, {}
        for video in videos:
            anns = [a for a in annotations if a["video_id"] == video["id"]]
            expressions = {}
            for category in sorted({a["category_id"] for a in anns}):
                ids = [a["id"] for a in anns if a["category_id"] == category]
                expressions[str(len(expressions))] = {"exp": names[category], "obj_id": ids, "anno_id": [str(i) for i in ids],
                                                      "category": names[category]}
            meta[video["file_names"][0].split("/")[0]] = {"frames": [f.split("/")[1][:-4] for f in video["file_names"]],
                                                          "expressions": expressions}
            for a in anns:  # VISA's mask_dict holds string counts
                mask_dict[str(a["id"])] = [None if s is None else s if isinstance(s["counts"], str) else compressed_rle(
                    _decode_list_rle(s)) for s in a["segmentations"]]
        (root / split / "meta_expressions.json").write_text(json.dumps({"videos": meta}))
        (root / split / "mask_dict.json").write_text(json.dumps(mask_dict))
    return root


def _decode_list_rle(rle: dict) -> np.ndarray:
    """Independent of pycocotools: alternate runs of 0 and 1 in column-major order."""
    height, width = rle["size"]
    values = np.arange(len(rle["counts"])) % 2
    return np.repeat(values, rle["counts"]).astype(np.uint8).reshape(width, height).T


def decode_rle_independently(rle: dict | None, height: int, width: int) -> np.ndarray:
    """The ground truth of a source RLE: list counts decoded here, string counts by pycocotools (not through our code)."""
    if rle is None:
        return np.zeros((height, width), np.uint8)
    if isinstance(rle["counts"], list):
        return _decode_list_rle(rle)
    return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
