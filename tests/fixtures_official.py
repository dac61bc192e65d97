"""Tiny datasets in the official layouts, written into a temporary directory for tests.

``write_tiny_mevis`` uses synthetic videos (``write_mevis_layout``) with raw-looking expression text;
``write_tiny_ref_youtube_vos`` draws its own frames and palette PNGs, independent of the synthetic
generator. Both return the dataset root to pass to the converters (``open_*``/``prepare_official``).
Import as ``from fixtures_official import ...`` (pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

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
